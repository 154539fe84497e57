"""Precision audit: which layers overflow or underflow in float16, and what loss scale to use.

Backend-agnostic: gradients are taken with the backend's own autodiff
(`tfmp._autodiff.gradients`: `tf.GradientTape`, `jax.grad` or `torch.autograd`).
This module holds the computation (`audit_model`, the graph walk, the
gradient statistics, `activation_bytes_per_example`); the report it returns
(`AuditReport`, `LayerAudit`, `GradientAudit`, with `fnmatch_escape`,
`recommended_loss_scale` and the float16/bfloat16 limits) lives in
`tfmp.audit_report` and is re-exported here.

`audit_model(model, x, y)` runs one batch through two copies of `model` that
share its weights: a float32 copy (the reference) and a copy under the mixed
policy. For every layer it reports

- `max_abs_activation` and `min_abs_activation`: the largest and the smallest
  non-zero |activation| of the float32 run;
- `overflow`: the float32 activation does not fit the dtype the layer outputs
  in the mixed run (|a| > 65504 for float16), or the mixed run turns finite
  inputs into inf/NaN inside the layer;
- `underflow_fraction`: the share of the non-zero float32 activations below
  the smallest value that dtype keeps (float16: the smallest subnormal, 2**-24;
  bfloat16: the smallest normal, 2**-126, as its subnormals are usually
  flushed), which become 0 in the mixed run;
- `relative_error`: `||mixed - float32|| / ||float32||` of the layer's output
  (`inf`, `None` in `to_dict()`, when the mixed output is not finite);
- `recommend_float32` and `reason`: whether the layer should compute in float32
  (see below). Layers already float32 in the mixed run are never recommended.

A layer is recommended for float32 when it computes in float16/bfloat16 and

1. it overflows, or more than `UNDERFLOW_THRESHOLD` of its non-zero
   activations underflow;
2. one of its inputs comes from a layer whose float32 activations are out of
   its range (too large, or more than `UNDERFLOW_THRESHOLD` too small): Keras
   casts a layer's inputs to its compute dtype, so a float32 producer alone does
   not help while its consumer casts the values back to float16;
3. it feeds a `keras.ops` call (`x + y`, `ops.exp`...) that overflows or
   underflows: such calls have no policy and follow their inputs' dtype;
4. its relative error exceeds `ERROR_THRESHOLD` and is at least `ERROR_JUMP`
   times the largest relative error of its inputs: the error appears here
   rather than being inherited.

Gradients (when `y` is given) are taken in the float32 copy, for the trainable
weights and for every top-level layer output (the activation gradients that
flow in float16 through a mixed backward pass). The report gives a log2
histogram of their non-zero magnitudes, the share that would underflow in
float16 without loss scaling and with the scale used (`loss_scale`, else the
recommended one), and `recommended_initial_scale`: the largest power of two
that keeps the largest scaled gradient below 65504 with `GRADIENT_HEADROOM`
(2**-5: 32x, five doublings of room for other batches and for the training to
come), clamped to [`MIN_LOSS_SCALE`, `MAX_LOSS_SCALE`] = [1, 2**24] (2**24 when
every gradient is zero). Under bfloat16 no loss scaling is needed, so the
recommendation is None.

`nonfinite_inputs` counts the NaN/inf values in the batch itself (`x`, `x[i]`, `y`...).

Scope: the model must be Sequential or Functional (what
`tfmp.convert.apply_policy` clones). Nested Sequential/Functional models are
recursed into: their layers are reported as `outer/inner`, and
`recommended_float32_layers` lists their bare names, which `apply_policy`
matches at any depth. Any other layer with sub-layers (e.g.
`MultiHeadAttention`) is one row. A layer called more than once is audited at
its first call. The batch runs in inference mode unless `training=True`
(dropout would otherwise make the two runs differ).

Example:

    report = tfmp.audit.audit_model(model, x, y, loss="sparse_categorical_crossentropy")
    print(report)                       # one row a layer, then the gradients
    fixed = tfmp.convert.apply_policy(
        model, "mixed_float16", float32_names=report.recommended_float32_layers)
    fixed.compile(tfmp.LossScaleOptimizer(keras.optimizers.Adam(),
                                          initial_scale=report.recommended_initial_scale),
                  "sparse_categorical_crossentropy")
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import tree
from keras.src.backend.common.masking import get_keras_mask, set_keras_mask
from keras.src.models.functional import operation_fn as functional_operation_fn
from keras.src.ops.function import make_node_key

from tfmp import _autodiff, convert, policies
from tfmp import layers as tfmp_layers
from tfmp.audit_report import (
    _LIMITS,
    BFLOAT16_MAX,
    BFLOAT16_TINY,
    FLOAT16_MAX,
    FLOAT16_TINY,
    GRADIENT_HEADROOM,
    MAX_LOSS_SCALE,
    MIN_LOSS_SCALE,
    AuditReport,
    GradientAudit,
    LayerAudit,
    fnmatch_escape,
    nonfinite_counts,
    recommended_loss_scale,
)

UNDERFLOW_THRESHOLD = 0.01
ERROR_THRESHOLD = 0.1
ERROR_JUMP = 10.0

_MIXED_POLICIES = ("mixed_float16", "mixed_bfloat16")
# Layers whose constructor refuses a float16/bfloat16 policy.
_ALWAYS_FLOAT32 = (tfmp_layers.Softmax,)


# ------------------------------------------------------------------- checks


def _check_model(model) -> None:
    if not isinstance(model, (keras.Sequential, convert.Functional)):
        raise ValueError(
            "`model` must be a built keras.Sequential or Functional model. Received: "
            f"model={model!r} of type {type(model).__name__}")
    if not model.built or (isinstance(model, keras.Sequential) and model._functional is None):
        raise ValueError(
            f"`model` {model.name!r} is not built: start a Sequential with `keras.Input(shape)`.")


def _as_input_list(model, x) -> list:
    names = [t.name for t in model.inputs]
    if isinstance(x, dict):
        missing = [n for n in names if n not in x]
        if missing:
            raise ValueError(
                f"`x` is a dict without the model's input(s) {missing}. Expected keys: {names}. "
                f"Received keys: {sorted(x)}")
        values = [x[n] for n in names]
    elif isinstance(x, (list, tuple)):
        values = list(x)
    else:
        values = [x]
    if len(values) != len(names):
        raise ValueError(
            f"`x` must hold one array per model input ({len(names)}: {names}). "
            f"Received {len(values)} array(s).")
    arrays = []
    for value, ref in zip(values, model.inputs, strict=True):
        array = np.asarray(keras.ops.convert_to_numpy(value))
        expected = tuple(ref.shape)
        ok = array.ndim == len(expected) and all(
            e is None or e == a for e, a in zip(expected[1:], array.shape[1:], strict=True))
        if not ok or array.shape[0] < 1:
            raise ValueError(
                f"`x` has shape {array.shape} but the model's input {ref.name!r} expects "
                f"{expected} (None: any size; at least one example). Received: x.shape="
                f"{array.shape}")
        arrays.append(array.astype(ref.dtype) if array.dtype != ref.dtype else array)
    batch = {a.shape[0] for a in arrays}
    if len(batch) > 1:
        raise ValueError(f"The arrays of `x` have different batch sizes: {sorted(batch)}.")
    return arrays


def _resolve_loss(model, y, loss) -> Callable | None:
    if y is None:
        if loss is not None:
            raise ValueError(
                "`loss` was given but `y` is None: gradients need targets. "
                f"Received: loss={loss!r}")
        return None
    if loss is None:
        loss = getattr(model, "loss", None) if getattr(model, "compiled", False) else None
        if loss is None:
            raise ValueError(
                "`loss` is required when `y` is given and the model is not compiled with a "
                "loss, e.g. loss='sparse_categorical_crossentropy'. Received: loss=None")
    if isinstance(loss, (list, tuple)) and len(loss) == 1:
        loss = loss[0]
    if isinstance(loss, str):
        try:
            return keras.losses.get(loss)
        except ValueError:
            raise ValueError(
                f"Unknown `loss`: {loss!r}. Expected a Keras loss name or a callable "
                "`loss(y_true, y_pred)`.") from None
    if not callable(loss):
        raise ValueError(
            "`loss` must be a Keras loss name or a callable `loss(y_true, y_pred)` (one "
            f"output). Received: loss={loss!r}")
    return loss


# -------------------------------------------------------------- graph walk


def _graph(model):
    """`(function, [(operation, node), ...])` of a Sequential/Functional model's own graph."""
    fn = model._functional if isinstance(model, keras.Sequential) else model
    pairs = []
    for op in fn.operations:
        if isinstance(op, keras.layers.InputLayer):
            continue
        index = next(i for i in range(len(op._inbound_nodes))
                     if make_node_key(op, i) in fn._nodes)
        pairs.append((op, op._inbound_nodes[index]))
    return fn, pairs


def _probe(model):
    """A model from `model`'s inputs to every node output of its graph, and the graph."""
    fn, pairs = _graph(model)
    outputs = [t for _, node in pairs for t in node.output_tensors]
    return keras.Model(fn.inputs, outputs), fn, pairs


def _is_float(value) -> bool:
    return keras.backend.is_float_dtype(keras.backend.standardize_dtype(value.dtype))


def _recursable(op, node) -> bool:
    return convert._is_graph_model(op) and len(node.input_tensors) == len(_graph(op)[0].inputs)


class _Walker:
    """Walks the float32 and mixed graphs side by side, one `LayerAudit` a layer."""

    def __init__(self, dtype: str, training: bool):
        self.dtype = dtype
        self.training = training
        self.rows: list[LayerAudit] = []

    def walk(self, f32_model, mixed_model, f32_inputs, mixed_inputs, input_producers,
             prefix: str):
        f32_probe, f32_fn, f32_pairs = _probe(f32_model)
        mixed_probe, mixed_fn, mixed_pairs = _probe(mixed_model)
        # A probe with one output (a one-layer model) returns a tensor, not a list.
        f32_out = tree.flatten(f32_probe(list(f32_inputs), training=self.training))
        mixed_out = tree.flatten(mixed_probe(list(mixed_inputs), training=self.training))
        f32_values, mixed_values, producers = {}, {}, {}
        for t, value, producer in zip(f32_fn.inputs, f32_inputs, input_producers, strict=True):
            f32_values[id(t)] = value
            producers[id(t)] = producer
        for t, value in zip(mixed_fn.inputs, mixed_inputs, strict=True):
            mixed_values[id(t)] = value
        flat_f32 = [t for _, node in f32_pairs for t in node.output_tensors]
        flat_mixed = [t for _, node in mixed_pairs for t in node.output_tensors]
        for t, value in zip(flat_f32, f32_out, strict=True):
            f32_values[id(t)] = value
        for t, value in zip(flat_mixed, mixed_out, strict=True):
            mixed_values[id(t)] = value
        mixed_ids = {id(t): id(m) for t, m in zip(  # f32 tensor id -> mixed one, by position.
            [*flat_f32, *f32_fn.inputs], [*flat_mixed, *mixed_fn.inputs], strict=True)}
        for (op, node), (mixed_op, _) in zip(f32_pairs, mixed_pairs, strict=True):
            inputs_producers = [row for t in node.input_tensors
                                for row in producers.get(id(t), [])]
            if _recursable(op, node):
                inner_f32 = [f32_values[id(t)] for t in node.input_tensors]
                inner_mixed = [mixed_values[mixed_ids[id(t)]] for t in node.input_tensors]
                inner_producers = [producers.get(id(t), []) for t in node.input_tensors]
                outputs = self.walk(op, mixed_op, inner_f32, inner_mixed, inner_producers,
                                    f"{prefix}{op.name}/")
                for t, rows in zip(node.output_tensors, outputs, strict=True):
                    producers[id(t)] = rows
                continue
            ref = [f32_values[id(t)] for t in node.output_tensors]
            mixed = [mixed_values[mixed_ids[id(t)]] for t in node.output_tensors]
            row = self.audit_op(mixed_op, prefix, ref, mixed, inputs_producers)
            for t in node.output_tensors:
                producers[id(t)] = [row] if row is not None else []
        return [producers.get(id(t), []) for t in f32_fn.outputs]

    def audit_op(self, op, prefix, ref_values, mixed_values, input_rows) -> LayerAudit | None:
        pairs = [(np.asarray(keras.ops.convert_to_numpy(r)),
                  np.asarray(keras.ops.convert_to_numpy(m)))
                 for r, m in zip(ref_values, mixed_values, strict=True)
                 if _is_float(r) and _is_float(m)]
        if not pairs:
            return None  # No floating-point output (e.g. a boolean mask).
        dtype = keras.backend.standardize_dtype(mixed_values[0].dtype)
        is_layer = isinstance(op, keras.layers.Layer)
        compute_dtype = op.compute_dtype if is_layer else dtype
        ref = np.concatenate([r.astype(np.float64).ravel() for r, _ in pairs])
        mixed = np.concatenate([m.astype(np.float64).ravel() for _, m in pairs])
        ref_abs = np.abs(ref[np.isfinite(ref)])
        nonzero = ref_abs[ref_abs > 0]
        top, tiny = _LIMITS.get(dtype, _LIMITS["float32"])
        max_abs = float(ref_abs.max()) if ref_abs.size else 0.0
        min_abs = float(nonzero.min()) if nonzero.size else None
        underflow = float(np.mean(nonzero < tiny)) if nonzero.size else 0.0
        new_nonfinite = bool(np.any(~np.isfinite(mixed) & np.isfinite(ref)))
        inputs_finite = all(row.mixed_finite for row in input_rows)
        overflow = max_abs > top or (new_nonfinite and inputs_finite)
        if not np.all(np.isfinite(mixed)):
            relative_error = math.inf
        else:
            norm = float(np.linalg.norm(ref[np.isfinite(ref)]))
            diff = float(np.linalg.norm(np.nan_to_num(mixed - ref)))
            relative_error = diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)
        low = compute_dtype in ("float16", "bfloat16")
        low_top, low_tiny = _LIMITS[self.dtype]
        out_of_range = ""
        if max_abs > low_top:
            out_of_range = f"max |activation| {max_abs:.3g} > {self.dtype} max {low_top:.6g}"
        elif nonzero.size and np.mean(nonzero < low_tiny) > UNDERFLOW_THRESHOLD:
            out_of_range = (f"{np.mean(nonzero < low_tiny):.0%} of non-zero activations < "
                            f"{self.dtype} smallest {low_tiny:.3g}")
        reasons = []
        if overflow:
            reasons.append(out_of_range if max_abs > top else
                           f"{dtype} run turns finite inputs into inf/NaN")
        if underflow > UNDERFLOW_THRESHOLD:
            reasons.append(f"{underflow:.0%} of non-zero activations < {dtype} smallest "
                           f"{tiny:.3g} (flushed to 0)")
        for producer in input_rows:
            if low and producer.out_of_range:
                reasons.append(f"input from {producer.name!r} out of {compute_dtype} range "
                               f"({producer.out_of_range})")
        input_errors = [row.relative_error for row in input_rows]
        worst_input = max(input_errors, default=0.0)
        if (math.isfinite(relative_error) and relative_error > ERROR_THRESHOLD
                and math.isfinite(worst_input) and relative_error >= ERROR_JUMP * worst_input):
            reasons.append(f"relative error {relative_error:.2g} (inputs' {worst_input:.2g})")
        row = LayerAudit(
            name=prefix + op.name, pattern=fnmatch_escape(op.name),
            type=type(op).__name__ if is_layer else f"op:{type(op).__name__}",
            dtype=dtype, compute_dtype=compute_dtype, max_abs_activation=max_abs,
            min_abs_activation=min_abs, overflow=overflow, underflow_fraction=underflow,
            relative_error=relative_error, is_layer=is_layer,
            mixed_finite=bool(np.all(np.isfinite(mixed))), out_of_range=out_of_range,
            producers=input_rows)
        if is_layer:
            row.recommend_float32 = low and bool(reasons)
            row.reason = "; ".join(dict.fromkeys(reasons))
        elif reasons:
            # A keras.ops call follows its inputs' dtype: its producers must be float32.
            row.reason = ("keras.ops call follows its inputs' dtype: " + "; ".join(
                dict.fromkeys(reasons)))
            if overflow or underflow > UNDERFLOW_THRESHOLD:
                self._blame_producers(row, reasons[0])
        self.rows.append(row)
        return row

    def _blame_producers(self, row: LayerAudit, reason: str) -> None:
        for producer in row.producers:
            if producer.is_layer:
                if producer.compute_dtype in ("float16", "bfloat16"):
                    producer.recommend_float32 = True
                    extra = f"feeds {row.name!r} ({reason})"
                    producer.reason = "; ".join(r for r in (producer.reason, extra) if r)
            else:
                self._blame_producers(producer, reason)


# ---------------------------------------------------------------- gradients


def _magnitudes(tensors) -> np.ndarray:
    arrays = [np.abs(np.asarray(t, dtype=np.float64)).ravel() for t in tensors if t is not None]
    return np.concatenate(arrays) if arrays else np.zeros(0)


def _fractions(values: np.ndarray, dtype: str, scale: float) -> dict[str, Any]:
    top, tiny = _LIMITS[dtype]
    nonzero = values[values > 0]
    n = max(nonzero.size, 1)
    return {
        "count": int(values.size),
        "max_abs": float(values.max()) if values.size else 0.0,
        "underflow_fraction_unscaled": float(np.sum(nonzero < tiny) / n),
        "underflow_fraction_scaled": float(np.sum(nonzero * scale < tiny) / n),
        "overflow_fraction_scaled": float(np.sum(nonzero * scale > top) / n),
    }


def _perturbed_forward(fn, inputs, training: bool, perturbations, outputs: list):
    """Runs `fn`'s graph, adding `perturbations[i]` to its i-th float layer output.

    The outputs as computed (perturbed) are appended to `outputs` in call order;
    with `perturbations=None` nothing is added. The gradient of a loss with
    respect to a zero perturbation is its gradient with respect to that layer's
    output: the activation gradient that flows through a mixed backward pass.
    """

    def operation(op):
        call = functional_operation_fn(op, training=training)

        def perturbed(*args, **kwargs):
            result = call(*args, **kwargs)
            flat = []
            for value in tree.flatten(result):
                if _is_float(value):
                    if perturbations is not None:
                        mask = get_keras_mask(value)
                        value = value + perturbations[len(outputs)]
                        if mask is not None:
                            set_keras_mask(value, mask)
                    outputs.append(value)
                flat.append(value)
            return tree.pack_sequence_as(result, flat)

        return perturbed

    return fn._run_through_graph(inputs, operation_fn=operation)


def _loss_gradients(f32, loss_fn, inputs, y, training: bool):
    """The float32 copy's mean-loss gradients: `(weight_grads, activation_grads)` as numpy.

    Weights: the trainable variables. Activations: every float output of the
    top-level layers (a nested model is one layer here). Runs on every backend
    (`tfmp._autodiff.gradients`) and changes no variable: the forward pass runs
    in a `keras.StatelessScope` (a BatchNormalization under `training=True`
    does not update its moving statistics).
    """
    fn = _graph(f32)[0]
    inputs = [keras.ops.convert_to_tensor(x) for x in inputs]
    target = keras.ops.convert_to_tensor(y)
    variables = list(f32.trainable_variables)
    shapes: list = []
    with keras.StatelessScope():
        _perturbed_forward(fn, inputs, training, None, shapes)
    zeros = [keras.ops.zeros(keras.ops.shape(a), a.dtype) for a in shapes]

    def loss(values, perturbations):
        with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
            prediction = _perturbed_forward(fn, inputs, training, perturbations, [])
            return keras.ops.mean(loss_fn(target, prediction))

    weight_grads, activation_grads = _autodiff.gradients(
        loss, [v.value for v in variables], zeros)
    as_numpy = lambda grads: [keras.ops.convert_to_numpy(g) for g in grads if g is not None]  # noqa: E731
    return as_numpy(weight_grads), as_numpy(activation_grads)


def _gradient_audit(weight_grads, activation_grads, dtype: str, loss_scale: float | None
                    ) -> tuple[GradientAudit, float | None]:
    weights, activations = _magnitudes(weight_grads), _magnitudes(activation_grads)
    both = np.concatenate([weights, activations])
    max_abs = float(both.max()) if both.size else 0.0
    recommended = recommended_loss_scale(max_abs) if dtype == "float16" else None
    scale = float(loss_scale) if loss_scale is not None else (recommended or 1.0)
    nonzero = both[both > 0]
    exponents = np.frexp(nonzero)[1] - 1  # floor(log2 |g|), exactly.
    if exponents.size:
        lo, hi = int(exponents.min()), int(exponents.max())
        counts = np.bincount(exponents - lo, minlength=hi - lo + 1)
        histogram = {"exponents": list(range(lo, hi + 1)), "counts": counts.tolist()}
    else:
        histogram = {"exponents": [], "counts": []}
    total = _fractions(both, dtype, scale)

    def part(values):
        f = _fractions(values, dtype, scale)
        return {k: f[k] for k in ("count", "max_abs", "underflow_fraction_unscaled",
                                  "underflow_fraction_scaled")}

    audit = GradientAudit(
        count=total["count"], nonzero=int(nonzero.size), max_abs=max_abs,
        min_abs=float(nonzero.min()) if nonzero.size else None, histogram=histogram,
        underflow_fraction_unscaled=total["underflow_fraction_unscaled"],
        underflow_fraction_scaled=total["underflow_fraction_scaled"],
        overflow_fraction_scaled=total["overflow_fraction_scaled"], scale=scale,
        weights=part(weights), activations=part(activations))
    return audit, recommended


# --------------------------------------------------------- activation memory

_ITEMSIZE = {"bfloat16": 2, "bool": 1}


def activation_bytes_per_example(model: keras.Model) -> int:
    """Bytes of layer outputs that one example produces in a forward pass.

    The sum over every layer (and `keras.ops` call) of the model's graph of
    `prod(output_shape[1:]) * itemsize(output dtype)`, at the layer's first
    call; nested Sequential/Functional models are recursed into (their outputs
    are their last layers'), the model's inputs are not counted. Training keeps
    roughly these tensors for the backward pass, so this is how the batch that
    fits in memory grows: about 2x under a mixed policy for Dense/Conv models
    (their outputs are float16 or bfloat16), less where layers stay float32.

    Args:
        model: A built Sequential or Functional model with static shapes (but
            the batch dimension).

    Returns:
        The number of bytes per example.

    Raises:
        ValueError: for another kind of model, or an output with an unknown
            non-batch dimension.

    Example:

        >>> with tfmp.policy_scope("mixed_float16"):
        ...     m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8)])
        >>> activation_bytes_per_example(m)   # 8 float16 values
        16
    """
    _check_model(model)
    total = 0
    for op, node in _graph(model)[1]:
        if convert._is_graph_model(op):
            total += activation_bytes_per_example(op)
            continue
        for t in node.output_tensors:
            shape = tuple(t.shape[1:])
            if any(d is None for d in shape):
                raise ValueError(
                    f"The output of {op.name!r} has an unknown dimension {tuple(t.shape)}; "
                    "activation memory needs static shapes (but the batch).")
            dtype = keras.backend.standardize_dtype(t.dtype)
            itemsize = _ITEMSIZE.get(dtype) or np.dtype(dtype).itemsize
            total += math.prod(shape) * itemsize
    return int(total)


# ---------------------------------------------------------------------- API


def _target_dtype(model, policy: str | None) -> str:
    if policy is not None:
        return keras.DTypePolicy(policy).compute_dtype
    dtypes = {layer.compute_dtype for layer in model._flatten_layers(include_self=True)}
    for dtype in ("float16", "bfloat16"):
        if dtype in dtypes:
            return dtype
    raise ValueError(
        f"`policy=None` audits the model's own per-layer policies, but no layer of "
        f"{model.name!r} computes in float16 or bfloat16. Pass policy='mixed_float16' or "
        "'mixed_bfloat16'. Received: policy=None")


def audit_model(
    model: keras.Model,
    x,
    y=None,
    *,
    loss: str | Callable | None = None,
    policy: str | None = "mixed_float16",
    loss_scale: float | None = None,
    training: bool = False,
) -> AuditReport:
    """Runs one batch in float32 and under a mixed policy and reports per-layer precision.

    See the module docstring for what is measured and when a layer is
    recommended for float32.

    Args:
        model: A built Sequential or Functional model (any policies; it is not
            changed: the audit runs on copies with the same weights).
        x: One batch: an array, a list of arrays (one per model input) or a
            dict by input name.
        y: Targets for the gradient audit, or None to skip it.
        loss: A Keras loss name or `loss(y_true, y_pred)`; defaults to the
            compiled model's loss. Only with `y`.
        policy: `"mixed_float16"` or `"mixed_bfloat16"`: every floating-point
            layer of the mixed copy computes in it, except the output layers,
            which `tfmp.convert.apply_policy` always keeps float32, and
            `tfmp.layers.Softmax`, which only computes in float32 (it is
            `apply_policy(model, policy, float32_layers=(tfmp.layers.Softmax,))`:
            Keras' normalisation and softmax layers are audited in the policy
            too, to show whether they need float32). None: the mixed copy keeps
            the model's
            own per-layer policies, e.g. to re-audit a model converted with
            `apply_policy`.
        loss_scale: The loss scale for `underflow_fraction_scaled`; defaults to
            the recommended one.
        training: Run the batch in training mode (batch statistics, dropout).

    Returns:
        An `AuditReport`.

    Raises:
        ValueError: for a model that is not a built Sequential/Functional, a
            `float32` or unknown `policy`, an `x` that does not fit the model's
            inputs, `y` without a loss, or `loss` without `y`.

    Example:

        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
                                  keras.layers.Dense(2, activation="softmax")])
        report = audit_model(model, np.ones((2, 4)), np.zeros((2,)),
                             loss="sparse_categorical_crossentropy")
        report.to_dict()["recommended_float32_layers"]   # []
    """
    _check_model(model)
    if policy is not None:
        policies.validate_policy_name(policy, argument="policy", allow_auto=False)
        if policy not in _MIXED_POLICIES:
            raise ValueError(
                f"`policy` must be a mixed policy ({', '.join(_MIXED_POLICIES)}) or None for "
                f"the model's own per-layer policies. Received: policy={policy!r}")
    if loss_scale is not None and not (
            isinstance(loss_scale, (int, float)) and math.isfinite(loss_scale) and loss_scale > 0):
        raise ValueError(
            f"`loss_scale` must be a positive finite number or None. Received: "
            f"loss_scale={loss_scale!r}")
    inputs = _as_input_list(model, x)
    loss_fn = _resolve_loss(model, y, loss)
    if loss_fn is not None:
        y = np.asarray(keras.ops.convert_to_numpy(y))
        if y.shape[:1] != inputs[0].shape[:1]:
            raise ValueError(
                f"`y` has {y.shape[:1] or 'no'} examples but `x` has {inputs[0].shape[0]}. "
                f"Received: y.shape={y.shape}")
        if len(model.outputs) != 1:
            raise ValueError(
                f"The gradient audit supports single-output models; {model.name!r} has "
                f"{len(model.outputs)} outputs. Pass y=None to audit activations only.")
    f32 = convert.apply_policy(model, "float32")
    if policy is None:
        mixed = keras.models.clone_model(model)
        mixed.set_weights(model.get_weights())
    else:
        mixed = convert.apply_policy(model, policy, float32_layers=_ALWAYS_FLOAT32)
    dtype = _target_dtype(mixed, policy)
    walker = _Walker(dtype, training)
    walker.walk(f32, mixed, inputs, inputs, [[] for _ in inputs], "")
    gradients, recommended = None, None
    if loss_fn is not None:
        weight_grads, activation_grads = _loss_gradients(f32, loss_fn, inputs, y, training)
        gradients, recommended = _gradient_audit(weight_grads, activation_grads, dtype,
                                                 loss_scale)
    return AuditReport(model=model.name, policy=policy, dtype=dtype, layers=walker.rows,
                       gradients=gradients, recommended_initial_scale=recommended,
                       nonfinite_inputs=nonfinite_counts(x, y))


__all__ = [
    "BFLOAT16_MAX", "BFLOAT16_TINY", "ERROR_JUMP", "ERROR_THRESHOLD", "FLOAT16_MAX",
    "FLOAT16_TINY", "GRADIENT_HEADROOM", "MAX_LOSS_SCALE", "MIN_LOSS_SCALE",
    "UNDERFLOW_THRESHOLD", "AuditReport", "GradientAudit", "LayerAudit",
    "activation_bytes_per_example", "audit_model", "fnmatch_escape", "recommended_loss_scale",
]
