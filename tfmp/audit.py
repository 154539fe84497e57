"""Precision audit: which layers overflow or underflow in float16, and what loss scale to use.

Backend-agnostic: gradients are taken with the backend's own autodiff
(`tfmp._autodiff.gradients`: `tf.GradientTape`, `jax.grad` or `torch.autograd`).
This module holds `audit_model` (the orchestration) and
`activation_bytes_per_example`; the pieces live in `tfmp.audit_arguments` (the
argument checks), `tfmp.audit_graph` (the side-by-side graph walk),
`tfmp.audit_activations` (each layer's statistics and the float32 rules),
`tfmp.audit_gradients` (the gradient statistics) and `tfmp.audit_report` (the
report it returns: `AuditReport`, `LayerAudit`, `GradientAudit`, with
`fnmatch_escape`, `recommended_loss_scale` and the float16/bfloat16 limits,
re-exported here with the thresholds).

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

import keras
import numpy as np

from tfmp import convert
from tfmp import layers as tfmp_layers
from tfmp.audit_activations import ERROR_JUMP, ERROR_THRESHOLD, UNDERFLOW_THRESHOLD
from tfmp.audit_arguments import _check_model, _resolve_arguments
from tfmp.audit_gradients import _gradient_audit, _loss_gradients
from tfmp.audit_graph import _graph, _Walker
from tfmp.audit_report import (
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

# Layers whose constructor refuses a float16/bfloat16 policy.
_ALWAYS_FLOAT32 = (tfmp_layers.Softmax,)


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
        else:
            total += sum(_output_bytes(op, t) for t in node.output_tensors)
    return int(total)


def _output_bytes(op, tensor) -> int:
    """`prod(shape[1:]) * itemsize` of one output of `op`; raises for an unknown dimension."""
    shape = tuple(tensor.shape[1:])
    if any(d is None for d in shape):
        raise ValueError(
            f"The output of {op.name!r} has an unknown dimension {tuple(tensor.shape)}; "
            "activation memory needs static shapes (but the batch).")
    dtype = keras.backend.standardize_dtype(tensor.dtype)
    itemsize = _ITEMSIZE.get(dtype) or np.dtype(dtype).itemsize
    return math.prod(shape) * itemsize


# ---------------------------------------------------------------------- API


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
    inputs, y, loss_fn = _resolve_arguments(model, x, y, loss=loss, policy=policy,
                                            loss_scale=loss_scale)
    f32, mixed = _copies(model, policy)
    dtype = _target_dtype(mixed, policy)
    layers = _audit_layers(f32, mixed, inputs, dtype, training)
    gradients, recommended = _audit_gradients(f32, loss_fn, inputs, y, dtype, loss_scale,
                                              training)
    return AuditReport(model=model.name, policy=policy, dtype=dtype, layers=layers,
                       gradients=gradients, recommended_initial_scale=recommended,
                       nonfinite_inputs=nonfinite_counts(x, y))


def _copies(model, policy: str | None) -> tuple[keras.Model, keras.Model]:
    """`(float32 copy, mixed copy)` of `model`, sharing its weights' values."""
    f32 = convert.apply_policy(model, "float32")
    if policy is None:
        mixed = keras.models.clone_model(model)
        mixed.set_weights(model.get_weights())
    else:
        mixed = convert.apply_policy(model, policy, float32_layers=_ALWAYS_FLOAT32)
    return f32, mixed


def _target_dtype(model, policy: str | None) -> str:
    """The low-precision dtype audited against: the policy's, else the model's own."""
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


def _audit_layers(f32, mixed, inputs, dtype: str, training: bool) -> list[LayerAudit]:
    """One `LayerAudit` a layer (and `keras.ops` call), the two copies run on `inputs`."""
    walker = _Walker(dtype, training)
    walker.walk(f32, mixed, inputs, inputs, [[] for _ in inputs], "")
    return walker.rows


def _audit_gradients(f32, loss_fn: Callable | None, inputs, y, dtype: str,
                     loss_scale: float | None, training: bool
                     ) -> tuple[GradientAudit | None, float | None]:
    """`(GradientAudit, recommended initial scale)` of the float32 copy; Nones without a loss."""
    if loss_fn is None:
        return None, None
    weight_grads, activation_grads = _loss_gradients(f32, loss_fn, inputs, y, training)
    return _gradient_audit(weight_grads, activation_grads, dtype, loss_scale)


__all__ = [
    "BFLOAT16_MAX", "BFLOAT16_TINY", "ERROR_JUMP", "ERROR_THRESHOLD", "FLOAT16_MAX",
    "FLOAT16_TINY", "GRADIENT_HEADROOM", "MAX_LOSS_SCALE", "MIN_LOSS_SCALE",
    "UNDERFLOW_THRESHOLD", "AuditReport", "GradientAudit", "LayerAudit",
    "activation_bytes_per_example", "audit_model", "fnmatch_escape", "recommended_loss_scale",
]
