"""Private numerics helpers: dtype limits and the gradient check (`keras.ops`, every backend)."""

from __future__ import annotations

import keras
from keras import ops

FLOAT16_MAX = 65504.0
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 2.0**-126  # smallest normal float32
def is_slices(g) -> bool:
    """Whether `g` is a sparse gradient of rows (`tf.IndexedSlices`), without importing TF."""
    return hasattr(g, "indices") and hasattr(g, "values") and hasattr(g, "dense_shape")


def dtype_of(g) -> str:
    return keras.backend.standardize_dtype(g.dtype)


def divide_in_float32(g, scale):
    """`g / scale`, computed in float32 and cast back to `g`'s dtype.

    A 16-bit gradient is never divided by a 16-bit scale (2**16 is inf in
    float16). Sparse gradients stay sparse: only their values are divided.

    Args:
        g: A gradient (dense tensor or `tf.IndexedSlices`).
        scale: A float32 scalar.

    Returns:
        The unscaled gradient, of `g`'s dtype and kind.
    """
    if is_slices(g):
        return type(g)(divide_in_float32(g.values, scale), g.indices, g.dense_shape)
    dtype = dtype_of(g)
    if dtype == "float32":
        return ops.divide(g, scale)
    return ops.cast(ops.divide(ops.cast(g, "float32"), scale), dtype)


def squared_norm(g):
    """A float32 upper bound of `sum(g**2)`, inf where a square overflows its dtype.

    Dense: `sum(g**2)` in float32. Sparse rows (`tf.IndexedSlices`): computed
    on the values only (memory and time do not grow with the vocabulary), times
    the number of rows, which bounds the squared norm of the dense gradient
    when rows repeat an index (Cauchy-Schwarz). For float16 gradients, inf as
    soon as the sum passes float16's range: Keras' `clipnorm` and
    `global_clipnorm` sum the squares in the gradient's dtype, and Adam-type
    second moments of float16 variables hold the squares in float16.

    Args:
        g: A gradient (dense tensor or `tf.IndexedSlices`).

    Returns:
        A float32 scalar.
    """
    rows = None
    if is_slices(g):
        rows = ops.cast(ops.shape(g.indices)[0], "float32")
        g = g.values
    dtype = dtype_of(g)
    g32 = g if dtype == "float32" else ops.cast(g, "float32")
    total = ops.sum(ops.square(g32))
    if rows is not None:
        total = total * ops.maximum(rows, 1.0)
    if dtype == "float16":
        total = ops.where(ops.greater(total, FLOAT16_MAX), float("inf"), total)
    return total
