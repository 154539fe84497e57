"""Per-layer dtype policies for an existing model, and a per-layer dtype report.

`apply_policy(model, "mixed_float16")` returns a NEW model (Sequential or
Functional) with the same weights, where every layer computes in the given
policy except the layers that are numerically fragile in float16, which get a
`"float32"` policy. `summary(model)` prints, one row a layer, what each layer
computes in and which Dense/Conv/attention dimensions are not multiples of 8.
Both are backend-agnostic (Keras model cloning only, no TensorFlow).

Which layers stay float32 (`DEFAULT_FLOAT32_LAYERS`), why, and what TensorFlow's
automatic mixed precision (AMP) graph rewrite and PyTorch autocast do with the
same computation:

- `Softmax`, and any layer (`Activation`, `Dense`, `Conv*`, ...) whose
  `activation` is softmax or log_softmax: exp of the logits; a float16
  probability below 6e-8 is 0, so its log is -inf, and log_softmax needs a
  float32 log-sum-exp. TF AMP: Softmax, LogSoftmax and Log follow their inputs.
  PyTorch: softmax and log_softmax in float32. The whole layer is float32, its
  matmul included; such layers are rare outside the head, which is float32
  anyway as an output layer.
- Any layer with `activation="exponential"`: `exp(x)` overflows float16 for
  x > 11.09. TF AMP: Exp float32. PyTorch: exp float32.
- `BatchNormalization`: mean and variance of its input (sums of squares
  overflow 65504), from which the moving statistics are updated. TF AMP:
  FusedBatchNorm takes float16 with float32 statistics. PyTorch: batch_norm
  follows its inputs (cuDNN keeps float32 statistics).
- `LayerNormalization`, `GroupNormalization`, `RMSNormalization`: mean and
  variance (or mean square) over the features. TF AMP: Mean, Sum float32.
  PyTorch: layer_norm, group_norm float32.
- `UnitNormalization`: an L2 norm (sum of squares); in float16 stock Keras
  returns [0, 0] for [300, 300]. TF AMP: Sum, Pow float32. PyTorch: norms float32.
- `Normalization` (preprocessing): divides raw features by `sqrt(variance)`;
  a variance over 65504 is inf in float16, and stock Keras returns 0. TF AMP:
  Mean float32.
- `SpectralNormalization`: power iteration and L2 norms of the kernel (the
  wrapped layer follows the wrapper). TF AMP: Sum float32. PyTorch: norms float32.

Keras' BatchNormalization and LayerNormalization already compute their
statistics in float32 inside the layer, but their output is float16 under
`mixed_float16`; keeping the whole layer float32 costs two casts and buys a
float32 normalised activation. The two reference systems differ in where they
draw the line: TensorFlow's automatic mixed precision graph rewrite keeps Exp,
Pow, Sum, Mean and the softmax cross-entropy ops in float32 and lets Softmax
and Log follow their inputs; PyTorch autocast runs softmax, log_softmax,
layer_norm, group_norm, exp/log/pow, sums, norms and all losses in float32.
This list follows PyTorch for softmax and normalisation (whole Keras layers are
the unit here, not ops) and both systems for exp.

Left in the mixed policy on purpose: attention layers (`MultiHeadAttention`,
`Attention`, ...: their matmuls are what tensor cores speed up; their inner
softmax follows the layer, as in TF's rewrite; use `tfmp.layers`' float32-safe
versions or `float32_layers` to change that), global pooling (Keras' `ops.mean`
computes float16 means in float32), sigmoid/tanh/swish/gelu/softplus activations
(bounded or computed stably in float16), and Embedding.

The model's output layers always get a `"float32"` policy (their compute dtype
is float32, so the model returns float32 and its loss sees float32). Layers that
do not compute in floating point (e.g. `StringLookup`, `Hashing`) keep their
policy. Nested Sequential/Functional models are converted recursively.

Example:

    import keras, tfmp
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3),
                                           classes=10, alpha=0.35)
    mixed = tfmp.apply_policy(model, "mixed_float16")
    mixed.compile(tfmp.LossScaleOptimizer(keras.optimizers.Adam()),
                  "sparse_categorical_crossentropy")
    rows = tfmp.summary(mixed)   # prints the table; rows are JSON-ready dicts
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence

import keras
from keras import tree

from tfmp import layers as tfmp_layers
from tfmp import placement, policies
from tfmp.dtype_summary import summary  # noqa: F401 (re-exported: tfmp.convert.summary)

# The rules live in tfmp.placement (which also places float32 inside composite layers).
DEFAULT_FLOAT32_LAYERS = placement.DEFAULT_FLOAT32_LAYERS
has_float32_activation = placement.has_float32_activation

_FLOAT32 = "float32"


def _check_float32_layers(float32_layers) -> tuple:
    if isinstance(float32_layers, (str, type)) or not isinstance(float32_layers, Iterable):
        raise ValueError(
            "`float32_layers` must be a sequence of Keras layer classes or predicates "
            f"`fn(layer) -> bool`. Received: float32_layers={float32_layers!r}"
        )
    entries = tuple(float32_layers)
    for entry in entries:
        if isinstance(entry, type):
            ok = issubclass(entry, keras.layers.Layer)
        else:
            ok = callable(entry)
        if not ok:
            raise ValueError(
                "Every entry of `float32_layers` must be a Keras layer class or a predicate "
                f"`fn(layer) -> bool`. Received: {entry!r} in float32_layers={float32_layers!r}"
            )
    return entries


def _check_float32_names(float32_names) -> tuple[str, ...]:
    if isinstance(float32_names, str) or not isinstance(float32_names, Iterable):
        raise ValueError(
            "`float32_names` must be a sequence of fnmatch patterns, e.g. ('head*',). "
            f"Received: float32_names={float32_names!r}"
        )
    patterns = tuple(float32_names)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(
                "Every entry of `float32_names` must be a non-empty string pattern. "
                f"Received: {pattern!r} in float32_names={float32_names!r}"
            )
    return patterns


_is_graph_model = placement.is_graph_model


def _check_cloneable(model, where: str) -> None:
    if isinstance(model, keras.Model) and not _is_graph_model(model):
        raise ValueError(
            f"apply_policy() can only rebuild Sequential and Functional models; {where} "
            f"{model.name!r} is a subclassed model ({type(model).__name__}), whose layer "
            "graph Keras cannot clone. Instead, pass `dtype=` to the sensitive layers in "
            "its constructor (e.g. `keras.layers.LayerNormalization(dtype='float32')`) and "
            "build it under `tfmp.policy_scope('mixed_float16')`, or wrap them in "
            "`tfmp.layers.Float32`."
        )


def _output_layers(model) -> list:
    if isinstance(model, keras.Sequential):
        return model.layers[-1:]
    return [t._keras_history.operation for t in tree.flatten(model.outputs)]


def _is_float_policy(value) -> bool:
    if value is None:
        return True  # The global policy, a float one.
    name = value.get("config", {}).get("name") if isinstance(value, dict) else value
    return isinstance(name, str) and (
        name in policies.POLICIES or name in ("float16", "bfloat16", "float64"))


def _set_dtype(config: dict, dtype_config: dict) -> None:
    """Sets `dtype` in a layer config and in the float configs of the layers it wraps."""
    config["dtype"] = dtype_config
    for value in config.values():
        for item in value if isinstance(value, list) else [value]:
            inner = item.get("config") if isinstance(item, dict) else None
            if (isinstance(inner, dict) and "class_name" in item and "dtype" in inner
                    and _is_float_policy(inner["dtype"])):
                _set_dtype(inner, dtype_config)


class _Converter:
    """The state of one `apply_policy` call: rules in, (old, new) layer pairs out."""

    def __init__(self, policy: str, float32_layers: tuple, float32_names: tuple[str, ...],
                 by_behaviour: bool = True):
        self.policy = policy
        self.by_behaviour = by_behaviour
        self.classes = tuple(e for e in float32_layers if isinstance(e, type))
        self.predicates = tuple(e for e in float32_layers if not isinstance(e, type))
        self.patterns = float32_names
        self.matched: set[str] = set()
        self.pairs: list[tuple[keras.layers.Layer, keras.layers.Layer]] = []

    def wants_float32(self, layer) -> bool:
        hits = [p for p in self.patterns if fnmatch.fnmatchcase(layer.name, p)]
        self.matched.update(hits)
        return bool(hits) or isinstance(layer, self.classes) or any(
            p(layer) for p in self.predicates) or (
            self.by_behaviour and placement.behaviour(layer) is not None)

    def convert(self, model, *, all_float32: bool, outputs_float32: bool):
        outputs = {id(layer) for layer in _output_layers(model)} if outputs_float32 else set()

        def clone_function(layer):
            if not isinstance(layer, keras.layers.Layer):
                return layer  # a `keras.ops` call in the graph: stateless, follows its inputs
            # tfmp's Softmax computes in float32 only and refuses other policies.
            float32 = (all_float32 or isinstance(layer, tfmp_layers.Softmax)
                       or self.wants_float32(layer))
            if _is_graph_model(layer):
                return self.convert(layer, all_float32=float32,
                                    outputs_float32=id(layer) in outputs)
            _check_cloneable(layer, "its layer")
            name = _FLOAT32 if float32 or id(layer) in outputs else self.policy
            new = self.rebuild(layer, name)
            self.pairs.append((layer, new))
            return new

        new = keras.models.clone_model(model, clone_function=clone_function)
        # The container's own policy decides whether `compile()` adds loss scaling.
        new.dtype_policy = _FLOAT32 if all_float32 else self.policy
        return new

    @staticmethod
    def rebuild(layer, policy_name: str):
        try:
            return _Converter._rebuild(layer, policy_name)
        except ValueError:
            raise
        except Exception as e:  # e.g. keras-hub 0.32's Llama and ViT layers
            cls = type(layer)
            raise ValueError(
                f"Layer {layer.name!r} ({cls.__module__}.{cls.__name__}) cannot be rebuilt "
                f"from its get_config() ({type(e).__name__}: {' '.join(str(e).split())[:300]}), "
                "so apply_policy() cannot copy the model. Build the model from its "
                "constructor with `dtype=tfmp.placement.policy_map(model)` instead.") from None

    @staticmethod
    def _rebuild(layer, policy_name: str):
        config = layer.get_config()
        if "dtype" not in config:
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) has no 'dtype' in its "
                "get_config(), so its policy cannot be set. Make its get_config() start "
                "from `super().get_config()` and its __init__ pass **kwargs to the base class."
            )
        if not keras.backend.is_float_dtype(layer.compute_dtype):
            return type(layer).from_config(config)  # e.g. StringLookup, Hashing.
        if layer.dtype_policy.quantization_mode is not None:
            raise ValueError(
                f"Layer {layer.name!r} is quantized (policy {layer.dtype_policy.name!r}); "
                "apply_policy() converts float models only. Apply the policy before "
                "`model.quantize()`."
            )
        _set_dtype(config, keras.dtype_policies.serialize(keras.DTypePolicy(policy_name)))
        # Sub-layers a constructor creates without `dtype=` follow the layer's policy.
        with policies.policy_scope(policy_name):
            return type(layer).from_config(config)


def apply_policy(
    model: keras.Model,
    policy: str = "mixed_float16",
    *,
    float32_layers: Sequence[type | Callable[[keras.layers.Layer], bool]] = DEFAULT_FLOAT32_LAYERS,
    float32_names: Sequence[str] = (),
    float32_paths: Sequence[str] = (),
    nested: bool = True,
    by_behaviour: bool | None = None,
) -> keras.Model:
    """Returns a copy of `model` with `policy` on every layer but the fragile ones.

    A layer gets `"float32"` when it is an instance of a class in
    `float32_layers`, or a predicate in `float32_layers` returns True for it, or
    its name matches a pattern in `float32_names`, or it produces one of the
    model's outputs. Every other floating-point layer gets `policy`. Nested
    Sequential/Functional models are converted layer by layer; a nested model
    that is itself listed gets `"float32"` on all its layers.

    With `nested` (the default), layers inside composite layers (a Transformer
    block's normalisations, keras-hub's `RMSNormalization`) are placed too, in
    the copy, by the same rules and by what they do (`tfmp.placement`): they
    compute in float32 and return the enclosing layer's dtype. Their placement
    is not saved where the enclosing layer rebuilds them from its own config
    (keras-hub blocks): build such models with `dtype=tfmp.placement.policy_map(...)`.

    Weights (trainable and not) are copied exactly: variables are float32 under
    every mixed policy. Shared layers stay shared. The copy's own policy is
    `policy`. If `model` was compiled, the copy is compiled from the same config
    (fresh optimizer state) with its optimizer in `tfmp.LossScaleOptimizer`
    (never Keras' own): loss scaling under `mixed_float16`, non-finite steps
    skipped under every policy, and non-trainable state guarded (see
    `LossScaleOptimizer.guard_state`). Keras does not save a Functional model's own
    policy, so after `keras.saving.load_model` compile it with
    `tfmp.LossScaleOptimizer` explicitly (the layers' policies are saved).
    A subclass of Functional whose constructor does not take `(inputs,
    outputs)` comes back as a plain Functional model (Keras' `clone_model`).

    Args:
        model: A built `keras.Sequential` or Functional model. Subclassed models
            cannot be cloned and raise `ValueError`.
        policy: `"mixed_float16"`, `"mixed_bfloat16"`, `"float32"` or `"auto"`.
        float32_layers: Layer classes (matched with `isinstance`) and predicates
            `fn(layer) -> bool` that select layers to keep in float32. Defaults
            to `DEFAULT_FLOAT32_LAYERS`; extend it with
            `DEFAULT_FLOAT32_LAYERS + (MyLayer,)`.
        float32_names: Shell-style `fnmatch` patterns (case-sensitive, matched
            against the whole layer name, e.g. `"block_16_*"`); every pattern
            must match at least one layer (at any depth with `nested`).
        float32_paths: `fnmatch` patterns matched against nested layers' paths
            (`"transformer_layer_0/*"`); only with `nested`.
        nested: Also place float32 inside composite layers (`tfmp.placement`).
        by_behaviour: Also keep float32 the layers that normalise or take a
            softmax by what they do, whatever their class (`placement.behaviour`).
            Default (None): only with the default `float32_layers`, so that a
            list of your own (`()`: only the outputs float32) is the whole rule.

    Returns:
        A new model with the same inputs, outputs and weights.

    Raises:
        ValueError: for an unknown `policy`, a subclassed or unbuilt model, a
            malformed `float32_layers`/`float32_names`, or a pattern that
            matches no layer.

    Example:

        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
        ...                           keras.layers.LayerNormalization(),
        ...                           keras.layers.Dense(2, activation="softmax")])
        >>> mixed = apply_policy(model, "mixed_float16")
        >>> [layer.dtype_policy.name for layer in mixed.layers]
        ['mixed_float16', 'float32', 'float32']
    """
    policy = policies.resolve_policy(policies.validate_policy_name(policy, argument="policy"))
    if not isinstance(model, keras.Model):
        raise ValueError(
            "`model` must be a keras.Model (Sequential or Functional). "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    _check_cloneable(model, "the model")
    if not model.built:
        raise ValueError(
            f"`model` {model.name!r} is not built, so it has no weights to copy. Build it "
            "first (start a Sequential with `keras.Input(shape)`, or call it on data)."
        )
    converter = _Converter(
        policy, _check_float32_layers(float32_layers), _check_float32_names(float32_names),
        by_behaviour=(float32_layers is DEFAULT_FLOAT32_LAYERS if by_behaviour is None
                      else bool(by_behaviour)))
    new = converter.convert(model, all_float32=False, outputs_float32=True)
    for old, clone in converter.pairs:
        if old.weights:
            clone.set_weights(old.get_weights())
    if nested:
        rules = placement.Float32Rules(layers=converter.classes + converter.predicates,
                                       names=converter.patterns, paths=tuple(float32_paths),
                                       by_behaviour=converter.by_behaviour)
        placement.place_nested(new, rules)
        converter.matched.update(p for p in converter.patterns for layer, _ in placement.walk(
            new) if fnmatch.fnmatchcase(layer.name, p))
    unmatched = [p for p in converter.patterns if p not in converter.matched]
    if unmatched:
        names = [layer.name for layer, _ in converter.pairs]
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise ValueError(
            f"`float32_names` pattern(s) {unmatched} matched no layer (fnmatch, whole "
            f"name, case-sensitive). Received: float32_names={list(converter.patterns)}. "
            f"Layer names: {shown}"
        )
    if model.compiled:  # Again, now that the copy's own policy is set.
        _compile_like(new, model, policy)
    return new


def _compile_like(new: keras.Model, model: keras.Model, policy: str) -> None:
    """Compiles `new` from `model`'s compile config, with tfmp's LossScaleOptimizer.

    The optimizer (Keras' `LossScaleOptimizer` unwrapped) is wrapped in
    `tfmp.LossScaleOptimizer`: scaling under `mixed_float16`, skipping of
    non-finite steps under every policy, and the copy's non-trainable state
    guarded on skipped steps. Fresh optimizer state, as `compile_from_config`.
    """
    from tfmp.optimizers import LossScaleOptimizer

    config = dict(model.get_compile_config())
    optimizer = keras.optimizers.get(config.get("optimizer") or "rmsprop")
    if not isinstance(optimizer, LossScaleOptimizer):
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            optimizer = optimizer.inner_optimizer
        optimizer = LossScaleOptimizer(optimizer, enabled=policy == "mixed_float16")
    config["optimizer"] = keras.optimizers.serialize(optimizer)
    new.compile_from_config(config)
    new.optimizer.guard_state(new)

