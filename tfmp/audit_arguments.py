"""The precision audit's argument checks: the model, the policy, the batch and the loss.

`tfmp.audit.audit_model` and `activation_bytes_per_example` call these before
any work; each raises a `ValueError` naming the argument, what was received and
what is expected. `_resolve_arguments` runs them all in order and returns the
batch as numpy arrays (one per model input), the targets and the loss function.
Uses `keras` and numpy only: no TensorFlow.

Example:

    inputs, y, loss_fn = _resolve_arguments(model, x, y, loss="mse",
                                            policy="mixed_float16", loss_scale=None)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras
import numpy as np

from tfmp import convert, policies

_MIXED_POLICIES = ("mixed_float16", "mixed_bfloat16")


def _resolve_arguments(model, x, y, *, loss, policy: str | None, loss_scale: float | None
                       ) -> tuple[list[np.ndarray], np.ndarray | None, Callable | None]:
    """Checks `audit_model`'s arguments: `(inputs, y, loss_fn)`, y and loss_fn None together.

    `inputs` holds one numpy array per model input, in the model's dtypes;
    `y` is a numpy array when gradients are audited.
    """
    _check_model(model)
    _check_policy(policy)
    _check_loss_scale(loss_scale)
    inputs = _as_input_list(model, x)
    loss_fn = _resolve_loss(model, y, loss)
    if loss_fn is not None:
        y = _check_targets(model, y, inputs)
    return inputs, y, loss_fn


def _check_model(model) -> None:
    if not convert._is_graph_model(model):
        raise ValueError(
            "`model` must be a built keras.Sequential or Functional model. Received: "
            f"model={model!r} of type {type(model).__name__}")
    if not model.built or (isinstance(model, keras.Sequential) and model._functional is None):
        raise ValueError(
            f"`model` {model.name!r} is not built: start a Sequential with `keras.Input(shape)`.")


def _check_policy(policy: str | None) -> None:
    """A mixed policy name, or None for the model's own per-layer policies."""
    if policy is None:
        return
    policies.validate_policy_name(policy, argument="policy", allow_auto=False)
    if policy not in _MIXED_POLICIES:
        raise ValueError(
            f"`policy` must be a mixed policy ({', '.join(_MIXED_POLICIES)}) or None for "
            f"the model's own per-layer policies. Received: policy={policy!r}")


def _check_loss_scale(loss_scale) -> None:
    if loss_scale is not None and not (
            isinstance(loss_scale, (int, float)) and math.isfinite(loss_scale) and loss_scale > 0):
        raise ValueError(
            f"`loss_scale` must be a positive finite number or None. Received: "
            f"loss_scale={loss_scale!r}")


def _as_input_list(model, x) -> list:
    """`x` as one numpy array per model input, in the inputs' dtypes, one batch size."""
    arrays = [_as_input_array(value, ref)
              for value, ref in zip(_input_values(model, x), model.inputs, strict=True)]
    batch = {a.shape[0] for a in arrays}
    if len(batch) > 1:
        raise ValueError(f"The arrays of `x` have different batch sizes: {sorted(batch)}.")
    return arrays


def _input_values(model, x) -> list:
    """`x` (an array, a list or a dict by input name) as a list in the model's input order."""
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
    return values


def _as_input_array(value, ref) -> np.ndarray:
    """`value` as a numpy array of the model input `ref`'s dtype, checked against its shape."""
    array = np.asarray(keras.ops.convert_to_numpy(value))
    expected = tuple(ref.shape)
    ok = array.ndim == len(expected) and all(
        e is None or e == a for e, a in zip(expected[1:], array.shape[1:], strict=True))
    if not ok or array.shape[0] < 1:
        raise ValueError(
            f"`x` has shape {array.shape} but the model's input {ref.name!r} expects "
            f"{expected} (None: any size; at least one example). Received: x.shape="
            f"{array.shape}")
    return array.astype(ref.dtype) if array.dtype != ref.dtype else array


def _resolve_loss(model, y, loss) -> Callable | None:
    """The loss function for the gradient audit: `loss`, else the compiled one; None without y."""
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
    return _loss_function(loss)


def _loss_function(loss) -> Callable:
    """A Keras loss name, a callable, or a one-element list of either, as a callable."""
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


def _check_targets(model, y, inputs: list[np.ndarray]) -> np.ndarray:
    """`y` as a numpy array, one target per example, for a single-output model."""
    y = np.asarray(keras.ops.convert_to_numpy(y))
    if y.shape[:1] != inputs[0].shape[:1]:
        raise ValueError(
            f"`y` has {y.shape[:1] or 'no'} examples but `x` has {inputs[0].shape[0]}. "
            f"Received: y.shape={y.shape}")
    if len(model.outputs) != 1:
        raise ValueError(
            f"The gradient audit supports single-output models; {model.name!r} has "
            f"{len(model.outputs)} outputs. Pass y=None to audit activations only.")
    return y
