"""Losses computed in float32 whatever the dtype of `y_pred`.

Each function casts `y_true` and `y_pred` to float32 and returns a float32
loss, also when called bare on a float16 prediction in a custom
`tf.GradientTape` loop (Keras' functions then return float16). Each class is a
subclass of the Keras loss of the same name whose `dtype` is float32, whatever
the global policy or the `dtype` passed to Keras' own class.

Cross-entropy from a softmax or sigmoid output is computed from the logits
where Keras kept them: `keras.activations.softmax`/`sigmoid` attach the logits
to their output as `_keras_logits`. Keras' loss objects cast a float16 output to
float32 first and lose them, so a true-class probability that underflowed to 0
in float16 is clipped to 1e-7 and the loss reads 16.12 instead of, say, 20.0.
These losses read the logits before any cast and compute
`log_softmax(float32(logits))` instead. Where no logits are attached (a
traced JAX array under `jit`, as in JAX's `fit` and `evaluate`; a squeezed
prediction; a raw `ops.softmax`), the float32 cast of `y_pred` is used, as in
Keras, and the loss equals the float32 model's (which clips the same way). Eager
JAX arrays carry the logits. On JAX, to keep extreme logits in `fit`, end the
model with `tfmp.layers.OutputHead(n, activation=None)` and use
`from_logits=True`.

In `compile`, pass a loss *object* (`tfmp.losses.SparseCategoricalCrossentropy()`):
Keras wraps a bare function in its own `LossFunctionWrapper`, which casts
`y_pred` before the function sees it. A float32 output layer
(`tfmp.layers.OutputHead`, `tfmp.layers.Softmax`) keeps its logits either way.

Example:

    loss_fn = tfmp.losses.SparseCategoricalCrossentropy()
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x))            # float32, from the logits
"""

from __future__ import annotations

import warnings

import keras
from keras import ops
from keras.src.backend.common.masking import get_keras_mask, set_keras_mask


def _float32_policy(dtype):
    policy = keras.dtype_policies.get("float32" if dtype is None else dtype)
    if policy.compute_dtype != "float32":
        raise ValueError(
            "`dtype` must be None or a float32 dtype (policy): tfmp losses compute in "
            f"float32, not {policy.compute_dtype}. Received: dtype={dtype!r}"
        )
    return policy


def _logits_or_float32(y_pred, from_logits: bool, fn_name: str):
    """`(prediction, from_logits)`: Keras' cached logits in float32 where present."""
    logits = getattr(y_pred, "_keras_logits", None)
    if logits is not None:
        if from_logits:
            warnings.warn(
                f"`{fn_name}` received `from_logits=True`, but `y_pred` was produced by a "
                "softmax or sigmoid activation; its logits are used.",
                stacklevel=3,
            )
        return ops.cast(logits, "float32"), True
    return ops.cast(y_pred, "float32"), from_logits


def _with_float32_logits(y_pred):
    """`y_pred` in float32, keeping Keras' cached logits (as float32) and mask."""
    logits = getattr(y_pred, "_keras_logits", None)
    if logits is None:
        return y_pred
    y32 = ops.cast(y_pred, "float32")
    if y32 is y_pred:
        return y_pred
    try:
        y32._keras_logits = ops.cast(logits, "float32")
    except AttributeError:  # A C-type tensor: fall back to the probabilities.
        return y_pred
    mask = get_keras_mask(y_pred)
    if mask is not None:
        set_keras_mask(y32, mask)
    return y32


@keras.saving.register_keras_serializable(package="tfmp")
def sparse_categorical_crossentropy(
    y_true, y_pred, from_logits: bool = False, ignore_class: int | None = None, axis: int = -1,
    label_smoothing: float = 0.0,
):
    """`keras.losses.sparse_categorical_crossentropy` in float32, from logits where kept.

    Args:
        y_true: Integer class indices.
        y_pred: Probabilities (or logits with `from_logits=True`) of any float dtype.
        from_logits: Whether `y_pred` holds logits.
        ignore_class: Optional class index whose entries get a loss of 0.
        axis: The class axis.
        label_smoothing: In [0, 1]: the target puts `1 - label_smoothing +
            label_smoothing / classes` on the true class and `label_smoothing /
            classes` on each other one (Keras' sparse loss has no such argument).

    Returns:
        The float32 per-example loss.

    Example:

        >>> probs = keras.activations.softmax(ops.cast([[20.0, 0.0]], "float16"))
        >>> float(tfmp.losses.sparse_categorical_crossentropy([1], probs)[0])
        20.0
    """
    _check_label_smoothing(label_smoothing)
    y_pred, from_logits = _logits_or_float32(
        y_pred, from_logits, "sparse_categorical_crossentropy"
    )
    if label_smoothing:
        return _smoothed_sparse_crossentropy(y_true, y_pred, from_logits, ignore_class, axis,
                                             label_smoothing)
    return keras.losses.sparse_categorical_crossentropy(
        ops.convert_to_tensor(y_true),
        y_pred,
        from_logits=from_logits,
        ignore_class=ignore_class,
        axis=axis,
    )


def _check_label_smoothing(label_smoothing) -> None:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not (
            0 <= label_smoothing <= 1):
        raise ValueError("`label_smoothing` must be a number in [0, 1]. "
                         f"Received: label_smoothing={label_smoothing!r}")


def _smoothed_sparse_crossentropy(y_true, y_pred, from_logits, ignore_class, axis, smoothing):
    """Sparse cross-entropy against smoothed one-hot targets (float32 `y_pred`)."""
    labels = ops.cast(ops.convert_to_tensor(y_true), "int32")
    if len(labels.shape) == len(y_pred.shape):
        labels = ops.squeeze(labels, axis)
    valid = None if ignore_class is None else ops.not_equal(labels, ignore_class)
    if valid is not None:
        labels = ops.where(valid, labels, ops.zeros_like(labels))
    targets = ops.one_hot(labels, y_pred.shape[axis], axis=axis, dtype="float32")
    loss = keras.losses.categorical_crossentropy(
        targets, y_pred, from_logits=from_logits, label_smoothing=smoothing, axis=axis)
    return loss if valid is None else ops.where(valid, loss, ops.zeros_like(loss))


@keras.saving.register_keras_serializable(package="tfmp")
def categorical_crossentropy(
    y_true, y_pred, from_logits: bool = False, label_smoothing: float = 0.0, axis: int = -1
):
    """`keras.losses.categorical_crossentropy` in float32, from logits where kept.

    Args:
        y_true: One-hot (or soft) targets.
        y_pred: Probabilities (or logits with `from_logits=True`) of any float dtype.
        from_logits: Whether `y_pred` holds logits.
        label_smoothing: Float in [0, 1].
        axis: The class axis.

    Returns:
        The float32 per-example loss.

    Example:

        >>> probs = keras.activations.softmax(ops.cast([[20.0, 0.0]], "float16"))
        >>> float(tfmp.losses.categorical_crossentropy([[0.0, 1.0]], probs)[0])
        20.0
    """
    y_pred, from_logits = _logits_or_float32(y_pred, from_logits, "categorical_crossentropy")
    return keras.losses.categorical_crossentropy(
        ops.cast(y_true, "float32"),
        y_pred,
        from_logits=from_logits,
        label_smoothing=label_smoothing,
        axis=axis,
    )


@keras.saving.register_keras_serializable(package="tfmp")
def binary_crossentropy(
    y_true, y_pred, from_logits: bool = False, label_smoothing: float = 0.0, axis: int = -1
):
    """`keras.losses.binary_crossentropy` in float32, from logits where kept.

    Args:
        y_true: Binary targets.
        y_pred: Sigmoid probabilities (or logits with `from_logits=True`).
        from_logits: Whether `y_pred` holds logits.
        label_smoothing: Float in [0, 1].
        axis: The axis to average over.

    Returns:
        The float32 per-example loss.

    Example:

        >>> probs = keras.activations.sigmoid(ops.cast([[-20.0]], "float16"))
        >>> float(tfmp.losses.binary_crossentropy([[1.0]], probs)[0])
        20.0
    """
    y_pred, from_logits = _logits_or_float32(y_pred, from_logits, "binary_crossentropy")
    return keras.losses.binary_crossentropy(
        ops.cast(y_true, "float32"),
        y_pred,
        from_logits=from_logits,
        label_smoothing=label_smoothing,
        axis=axis,
    )


@keras.saving.register_keras_serializable(package="tfmp")
def mean_squared_error(y_true, y_pred):
    """`keras.losses.mean_squared_error` in float32.

    In float16 any squared error above 65504 (an error above 256) is `inf`.

    Args:
        y_true: Targets.
        y_pred: Predictions of any float dtype.

    Returns:
        The float32 mean over the last axis.

    Example:

        >>> float(tfmp.losses.mean_squared_error([[0.0]], ops.cast([[300.0]], "float16"))[0])
        90000.0
    """
    return keras.losses.mean_squared_error(
        ops.cast(y_true, "float32"), ops.cast(y_pred, "float32")
    )


class _Float32Loss:
    """Mixin for the loss classes: float32 dtype, tfmp function, logits kept.

    The Keras class's own constructor (arguments, defaults, `get_config`) is
    used as it is; only `dtype` is checked and the loss function swapped.
    """

    _tfmp_fn = None

    def __init__(self, *args, dtype=None, **kwargs):
        super().__init__(*args, dtype=_float32_policy(dtype), **kwargs)
        self.fn = type(self)._tfmp_fn

    def __call__(self, y_true, y_pred, sample_weight=None):
        return super().__call__(y_true, _with_float32_logits(y_pred), sample_weight)


@keras.saving.register_keras_serializable(package="tfmp")
class SparseCategoricalCrossentropy(_Float32Loss, keras.losses.SparseCategoricalCrossentropy):
    """`keras.losses.SparseCategoricalCrossentropy` in float32, from logits where kept.

    Args:
        from_logits: Whether `y_pred` holds logits.
        ignore_class: Optional class index whose entries get a loss of 0.
        label_smoothing: In [0, 1] (see `sparse_categorical_crossentropy`).
        reduction: As for Keras losses (`"sum_over_batch_size"`, ...).
        axis: The class axis.
        name: Optional name.
        dtype: `None` or `"float32"`; any other dtype is refused.

    Example:

        model.compile(optimizer=tfmp.LossScaleOptimizer(keras.optimizers.Adam()),
                      loss=tfmp.losses.SparseCategoricalCrossentropy(label_smoothing=0.1))
    """

    _tfmp_fn = staticmethod(sparse_categorical_crossentropy)

    def __init__(self, from_logits: bool = False, ignore_class: int | None = None,
                 label_smoothing: float = 0.0, reduction="sum_over_batch_size", axis: int = -1,
                 name: str = "sparse_categorical_crossentropy", dtype=None):
        _check_label_smoothing(label_smoothing)
        super().__init__(from_logits=from_logits, ignore_class=ignore_class,
                         reduction=reduction, axis=axis, name=name, dtype=dtype)
        self.label_smoothing = label_smoothing
        self._fn_kwargs["label_smoothing"] = label_smoothing

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


@keras.saving.register_keras_serializable(package="tfmp")
class CategoricalCrossentropy(_Float32Loss, keras.losses.CategoricalCrossentropy):
    """`keras.losses.CategoricalCrossentropy` in float32, from logits where kept.

    Args:
        from_logits: Whether `y_pred` holds logits.
        label_smoothing: Float in [0, 1].
        axis: The class axis.
        reduction: As for Keras losses.
        name: Optional name.
        dtype: `None` or `"float32"`; any other dtype is refused.

    Example:

        loss = tfmp.losses.CategoricalCrossentropy()(y_onehot, model(x))   # float32
    """

    _tfmp_fn = staticmethod(categorical_crossentropy)


@keras.saving.register_keras_serializable(package="tfmp")
class BinaryCrossentropy(_Float32Loss, keras.losses.BinaryCrossentropy):
    """`keras.losses.BinaryCrossentropy` in float32, from logits where kept.

    Args:
        from_logits: Whether `y_pred` holds logits.
        label_smoothing: Float in [0, 1].
        axis: The axis to average over.
        reduction: As for Keras losses.
        name: Optional name.
        dtype: `None` or `"float32"`; any other dtype is refused.

    Example:

        loss = tfmp.losses.BinaryCrossentropy()(y, model(x))   # float32
    """

    _tfmp_fn = staticmethod(binary_crossentropy)


@keras.saving.register_keras_serializable(package="tfmp")
class MeanSquaredError(_Float32Loss, keras.losses.MeanSquaredError):
    """`keras.losses.MeanSquaredError` in float32.

    Args:
        reduction: As for Keras losses.
        name: Optional name.
        dtype: `None` or `"float32"`; any other dtype is refused.

    Example:

        loss = tfmp.losses.MeanSquaredError()(y, model(x))   # float32
    """

    _tfmp_fn = staticmethod(mean_squared_error)
