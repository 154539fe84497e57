"""The precision audit's gradients: float32 loss gradients against float16's range.

`_loss_gradients` takes the float32 copy's mean-loss gradients for its trainable
weights and for every top-level layer output (the activation gradients that
flow in float16 through a mixed backward pass: the gradients with respect to a
zero perturbation added to each output, `_perturbed_forward`), on every backend
(`tfmp._autodiff.gradients`). `_gradient_audit` turns them into a
`GradientAudit` (log2 histogram, underflow/overflow fractions with and without
the loss scale) and the recommended initial loss scale; see the `tfmp.audit`
docstring. Uses `keras.ops` and numpy only: no TensorFlow.

Example:

    weight_grads, activation_grads = _loss_gradients(f32, loss_fn, [x], y, training=False)
    audit, scale = _gradient_audit(weight_grads, activation_grads, "float16", None)
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import tree
from keras.src.backend.common.masking import get_keras_mask, set_keras_mask
from keras.src.models.functional import operation_fn as functional_operation_fn

from tfmp import _autodiff
from tfmp.audit_graph import _graph, _is_float
from tfmp.audit_report import _LIMITS, GradientAudit, recommended_loss_scale


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
                        value = _add_keeping_mask(value, perturbations[len(outputs)])
                    outputs.append(value)
                flat.append(value)
            return tree.pack_sequence_as(result, flat)

        return perturbed

    return fn._run_through_graph(inputs, operation_fn=operation)


def _add_keeping_mask(value, perturbation):
    """`value + perturbation`, with `value`'s Keras mask (if any) set on the sum."""
    mask = get_keras_mask(value)
    value = value + perturbation
    if mask is not None:
        set_keras_mask(value, mask)
    return value


def _zero_perturbations(fn, inputs, training: bool) -> list:
    """Zeros shaped like every float layer output of `fn`'s graph, in call order."""
    shapes: list = []
    with keras.StatelessScope():
        _perturbed_forward(fn, inputs, training, None, shapes)
    return [keras.ops.zeros(keras.ops.shape(a), a.dtype) for a in shapes]


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
    zeros = _zero_perturbations(fn, inputs, training)

    def loss(values, perturbations):
        with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
            prediction = _perturbed_forward(fn, inputs, training, perturbations, [])
            return keras.ops.mean(loss_fn(target, prediction))

    weight_grads, activation_grads = _autodiff.gradients(
        loss, [v.value for v in variables], zeros)
    as_numpy = lambda grads: [keras.ops.convert_to_numpy(g) for g in grads if g is not None]  # noqa: E731
    return as_numpy(weight_grads), as_numpy(activation_grads)


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


def _part(values: np.ndarray, dtype: str, scale: float) -> dict[str, Any]:
    """`count`, `max_abs` and the two underflow fractions of one part (weights, activations)."""
    f = _fractions(values, dtype, scale)
    return {k: f[k] for k in ("count", "max_abs", "underflow_fraction_unscaled",
                              "underflow_fraction_scaled")}


def _histogram(nonzero: np.ndarray) -> dict[str, list[int]]:
    """`{"exponents", "counts"}`: how many values have each `floor(log2 |g|)`, no gaps."""
    exponents = np.frexp(nonzero)[1] - 1  # floor(log2 |g|), exactly.
    if not exponents.size:
        return {"exponents": [], "counts": []}
    lo, hi = int(exponents.min()), int(exponents.max())
    counts = np.bincount(exponents - lo, minlength=hi - lo + 1)
    return {"exponents": list(range(lo, hi + 1)), "counts": counts.tolist()}


def _gradient_audit(weight_grads, activation_grads, dtype: str, loss_scale: float | None
                    ) -> tuple[GradientAudit, float | None]:
    """The statistics of the gradients, and the recommended initial loss scale (float16 only)."""
    weights, activations = _magnitudes(weight_grads), _magnitudes(activation_grads)
    both = np.concatenate([weights, activations])
    max_abs = float(both.max()) if both.size else 0.0
    recommended = recommended_loss_scale(max_abs) if dtype == "float16" else None
    scale = float(loss_scale) if loss_scale is not None else (recommended or 1.0)
    nonzero = both[both > 0]
    total = _fractions(both, dtype, scale)
    audit = GradientAudit(
        count=total["count"], nonzero=int(nonzero.size), max_abs=max_abs,
        min_abs=float(nonzero.min()) if nonzero.size else None, histogram=_histogram(nonzero),
        underflow_fraction_unscaled=total["underflow_fraction_unscaled"],
        underflow_fraction_scaled=total["underflow_fraction_scaled"],
        overflow_fraction_scaled=total["overflow_fraction_scaled"], scale=scale,
        weights=_part(weights, dtype, scale), activations=_part(activations, dtype, scale))
    return audit, recommended
