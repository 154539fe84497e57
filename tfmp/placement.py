"""Where float32 goes: the rules, at every depth of a model, and as a `DTypePolicyMap`.

`apply_policy` rebuilds a model's graph-level layers; the layers *inside* a
composite layer (a Transformer block's normalisations, an attention layer's
softmax, keras-hub's own `RMSNormalization`) are created by its constructor or
`build()` and follow its policy. This module finds them and places float32 on
them:

- `Float32Rules`: which layers compute in float32, by class (`isinstance`), by
  predicate, by name pattern, by path pattern, and by what a layer does
  (`by_behaviour`): a class, or a base class, named `...Normalization`/`...Norm`
  or `...Softmax`, a layer with an `epsilon` and a `gamma`/`scale` weight (a
  normalisation, whatever its class), a softmax/log_softmax/exponential
  activation.
- `float32_placement(model, rules)`: `{path: reason}` for every such layer at
  every depth.
- `policy_map(model, policy, rules)`: the placement as a Keras `DTypePolicyMap`
  (keyed by layer path), to build a model from its constructor with the right
  per-layer policies (`keras_hub.models.GPT2Backbone(..., dtype=policy_map)`); a
  model built so saves and reloads with them.
- `place_nested(model, rules)`: sets `"float32"` in place on the matching layers
  nested inside composite layers, and casts their outputs back to the enclosing
  layer's compute dtype, so that a block's `x + residual` still adds two float16
  tensors (post-norm BERT blocks add a normalisation's output to the next
  sub-block's).

Keras' own `LayerNormalization` (3.15) already takes its mean and variance in
float32 and casts the result back; placing it in float32 adds nothing but the
cast of its input, which is float16 already. Keras' `MultiHeadAttention` calls
its `Softmax` sub-layer only with attention dropout or when the scores are
returned; otherwise `ops.dot_product_attention` computes the logits in float32.
That softmax has no path until it is called, so `policy_map` cannot key it.

Example:

    rules = Float32Rules(names=("*_layer_norm",))
    float32_placement(model, rules)     # {"transformer_layer_0/..._layer_norm": "..."}
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable, Iterator

import keras
from keras import tree

_FLOAT32 = "float32"
_FLOAT32_ACTIVATIONS = frozenset({"softmax", "log_softmax", "exponential"})
_SENSITIVE_CLASS = re.compile(r"(Normalization|Norm|Softmax)$")
_NORM_WEIGHTS = ("gamma", "scale")


def has_float32_activation(layer: keras.layers.Layer) -> bool:
    """Whether `layer`'s `activation` is softmax, log_softmax or exponential.

    Covers `Activation` layers and every layer with an `activation` argument
    (`Dense`, `Conv2D`, ...).

    Args:
        layer: A Keras layer.

    Returns:
        True if the layer's activation is one of those kept in float32.

    Example:

        >>> has_float32_activation(keras.layers.Dense(4, activation="softmax"))
        True
    """
    activation = getattr(layer, "activation", None)
    if activation is None:
        return False
    name = activation if isinstance(activation, str) else getattr(activation, "__name__", "")
    return name in _FLOAT32_ACTIVATIONS


DEFAULT_FLOAT32_LAYERS: tuple = (
    keras.layers.Softmax,
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
    keras.layers.RMSNormalization,
    keras.layers.UnitNormalization,
    keras.layers.Normalization,
    keras.layers.SpectralNormalization,
    has_float32_activation,
)


def behaviour(layer: keras.layers.Layer) -> str | None:
    """What makes `layer` numerically sensitive in float16, judged by what it does, or None.

    Args:
        layer: A Keras layer.

    Returns:
        A short reason: its class (or a base class) is a normalisation or a
        softmax by name, it has an `epsilon` and a scale weight, or a
        softmax/exponential activation.
    """
    for cls in type(layer).__mro__:
        if cls.__name__ in ("Layer", "Operation", "object"):
            break
        if _SENSITIVE_CLASS.search(cls.__name__):
            return f"{cls.__name__}: normalisation or softmax (by class name)"
    names = {w.path.rsplit("/", 1)[-1] for w in layer.weights if w.path}
    if isinstance(getattr(layer, "epsilon", None), float) and names & set(_NORM_WEIGHTS):
        return "a normalisation (an epsilon and a scale weight)"
    if has_float32_activation(layer):
        return "a softmax, log_softmax or exponential activation"
    return None


@dataclasses.dataclass(frozen=True)
class Float32Rules:
    """Which layers compute in float32.

    Attributes:
        layers: Layer classes (`isinstance`) and predicates `fn(layer) -> bool`.
        names: `fnmatch` patterns matched against the whole layer name.
        paths: `fnmatch` patterns matched against the layer's path
            (`"transformer_layer_0/*norm*"`).
        by_behaviour: Also match layers by what they do (`behaviour`), which
            finds normalisations and softmaxes of any library.
    """

    layers: tuple = DEFAULT_FLOAT32_LAYERS
    names: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    by_behaviour: bool = True

    def __post_init__(self):
        for field, values in (("names", self.names), ("paths", self.paths)):
            if isinstance(values, str) or not all(isinstance(v, str) and v for v in values):
                raise ValueError(f"`{field}` must be a tuple of non-empty fnmatch patterns. "
                                 f"Received: {field}={values!r}")
        for entry in self.layers:
            if not (callable(entry) or isinstance(entry, type)):
                raise ValueError("Every entry of `layers` must be a Keras layer class or a "
                                 f"predicate `fn(layer) -> bool`. Received: {entry!r}")

    def reason(self, layer: keras.layers.Layer) -> str | None:
        """Why `layer` computes in float32 under these rules, or None."""
        name, path = layer.name, getattr(layer, "path", None) or layer.name
        for pattern in self.names:
            if fnmatch.fnmatchcase(name, pattern):
                return f"name matches {pattern!r}"
        for pattern in self.paths:
            if fnmatch.fnmatchcase(path, pattern):
                return f"path matches {pattern!r}"
        for entry in self.layers:
            if isinstance(entry, type):
                if isinstance(layer, entry):
                    return f"a {entry.__name__}"
            elif entry(layer):
                return f"{getattr(entry, '__name__', 'a predicate')}(layer)"
        return behaviour(layer) if self.by_behaviour else None


def _children(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    # Keras has no public API for a layer's direct sub-layers.
    return list(layer._flatten_layers(include_self=False, recursive=False))


def walk(model: keras.layers.Layer) -> Iterator[tuple[keras.layers.Layer, keras.layers.Layer]]:
    """Every layer below `model`, depth first, with the layer that holds it."""
    for child in _children(model):
        yield child, model
        yield from walk(child)


def is_graph_model(layer) -> bool:
    """Whether `layer` is a Sequential or Functional model (a graph Keras can clone)."""
    from keras.src.models.functional import Functional  # no public name for it

    return isinstance(layer, (keras.Sequential, Functional))


def float32_placement(model: keras.layers.Layer, rules: Float32Rules | None = None
                      ) -> dict[str, str]:
    """`{path: reason}` of every layer below `model`, at every depth, that `rules` place
    in float32 (layers without a path, never built or called, are left out)."""
    rules = rules or Float32Rules()
    placement = {}
    for layer, _ in walk(model):
        path = getattr(layer, "path", None)
        if path and not is_graph_model(layer):
            reason = rules.reason(layer)
            if reason:
                placement[path] = reason
    return placement


def policy_map(model: keras.layers.Layer, policy: str = "mixed_float16",
               rules: Float32Rules | None = None) -> keras.dtype_policies.DTypePolicyMap:
    """The float32 placement of `model` as a `DTypePolicyMap` with `policy` as its default.

    Pass it as `dtype=` to the constructor of the same model (a keras-hub
    backbone, a subclassed model), which hands it to its layers: each looks up
    its own path. Build the model once (under any policy) to learn its paths.

    Args:
        model: A built model of the same configuration.
        policy: The policy of every other layer.
        rules: The float32 rules (default `Float32Rules()`).

    Returns:
        The `DTypePolicyMap`.

    Example:

        probe = keras_hub.models.GPT2Backbone(**config)
        mixed = keras_hub.models.GPT2Backbone(**config, dtype=policy_map(probe))
    """
    float32 = keras.DTypePolicy(_FLOAT32)
    return keras.dtype_policies.DTypePolicyMap(
        default_policy=keras.DTypePolicy(policy),
        policy_map={path: float32 for path in float32_placement(model, rules)})


def _cast_outputs_to(call: Callable, dtype: str) -> Callable:
    def call_then_cast(*args, **kwargs):
        outputs = call(*args, **kwargs)
        return tree.map_structure(
            lambda t: keras.ops.cast(t, dtype) if keras.backend.is_float_dtype(
                keras.backend.standardize_dtype(getattr(t, "dtype", "int32"))) else t, outputs)

    call_then_cast._tfmp_float32_inside = True
    return call_then_cast


def place_nested(model: keras.layers.Layer, rules: Float32Rules | None = None) -> list[str]:
    """Sets float32, in place, on the matching layers nested inside composite layers.

    Only layers held by a layer that is not a Sequential/Functional model (their
    placement `apply_policy` cannot rebuild) are changed. Each computes in
    float32 and returns its outputs in the compute dtype of the layer that holds
    it. The change lives in the layer objects: `model.save` keeps it only where
    the enclosing layer's config records its sub-layers' policies; build from a
    `policy_map` for a placement that reloads.

    Args:
        model: A built model (changed in place).
        rules: The float32 rules (default `Float32Rules()`).

    Returns:
        The paths of the layers changed.
    """
    rules = rules or Float32Rules()
    changed = []
    for layer, holder in walk(model):
        if is_graph_model(holder) or is_graph_model(layer) or not keras.backend.is_float_dtype(
                layer.compute_dtype) or layer.compute_dtype == _FLOAT32:
            continue
        if rules.reason(layer) is None:
            continue
        outer = holder.compute_dtype
        layer.dtype_policy = _FLOAT32
        if outer != _FLOAT32 and not getattr(layer.call, "_tfmp_float32_inside", False):
            layer.call = _cast_outputs_to(layer.call, outer)
        changed.append(getattr(layer, "path", None) or layer.name)
    return changed
