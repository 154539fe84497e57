"""Float32-safe normalisation layers: statistics and weights in float32 under any policy.

Under `mixed_float16` Keras' normalisation layers cast their inputs to float16
first, so an input above 65504 is `inf` before the statistics are taken, and
`RMSNormalization` rounds its `scale` to float16. These drop-ins take float32
inputs as they are (`autocast=False`), compute the statistics with float32
weights and return the compute dtype. They are written with `keras.ops` (every
backend), registered for `.keras` saving under the `"tfmp"` package, and
re-exported by `tfmp.layers`.

| layer | computes in | returns |
|---|---|---|
| `LayerNormalization` | float32 statistics, float32 `gamma`/`beta` | compute dtype |
| `RMSNormalization` | float32 statistics, float32 `scale` | compute dtype |

Example:

    keras.config.set_dtype_policy("mixed_float16")
    y = tfmp.layers.RMSNormalization()(np.array([[7e4, 1.0, 2.0, 3.0]], "float32"))
    # y is float16 and finite
"""

from __future__ import annotations

import math

import keras
from keras import ops

# The smallest normal float16 number. It is exactly representable in float16
# and is not flushed to zero by flush-to-zero (FTZ) float16 arithmetic, unlike
# Keras' default `RMSNormalization` epsilon (1e-6, a float16 subnormal).
FLOAT16_SAFE_EPSILON = 2.0**-14


def _check_epsilon(epsilon) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (
        0 < epsilon < math.inf
    ):
        raise ValueError(
            f"`epsilon` must be a finite number > 0. Received: epsilon={epsilon!r}"
        )
    return float(epsilon)


@keras.saving.register_keras_serializable(package="tfmp")
class LayerNormalization(keras.layers.LayerNormalization):
    """`keras.layers.LayerNormalization` with its statistics pinned to float32.

    The inputs are never cast to float16 on the way in (`autocast=False`: a
    float32 input of 70000, beyond float16's 65504, is normalised correctly),
    the mean, variance, `gamma` and `beta` are float32 on every backend, and
    the output is cast to the compute dtype. The default `epsilon=1e-3` is
    Keras' and is a normal float16 number; any finite `epsilon > 0` is accepted
    and is added in float32.

    Args:
        axis: Integer or list of integers, the axes to normalise over.
        epsilon: Finite number > 0 added to the variance.
        **kwargs: Every other `keras.layers.LayerNormalization` argument.

    Example:

        keras.config.set_dtype_policy("mixed_float16")
        y = tfmp.layers.LayerNormalization()(np.array([[7e4, 1.0, 2.0, 3.0]], "float32"))
        # y is float16 and finite: [[1.732, -0.577, -0.577, -0.577]]
    """

    def __init__(self, axis=-1, epsilon: float = 1e-3, **kwargs):
        super().__init__(axis=axis, epsilon=_check_epsilon(epsilon), **kwargs)
        self.autocast = False

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        gamma = None if self.gamma is None else ops.cast(self.gamma, "float32")
        beta = None if self.beta is None else ops.cast(self.beta, "float32")
        kwargs = {"rms_scaling": True} if self.rms_scaling else {}
        outputs = ops.layer_normalization(x, gamma, beta, self.axis, self.epsilon, **kwargs)
        return ops.cast(outputs, self.compute_dtype)


@keras.saving.register_keras_serializable(package="tfmp")
class RMSNormalization(keras.layers.RMSNormalization):
    """`keras.layers.RMSNormalization` with float32 statistics and a float32 scale.

    Keras' layer casts its inputs to the compute dtype first, so under
    `mixed_float16` a float32 input above 65504 becomes `inf` and the output
    NaN, and its `scale` weight is rounded to float16. Here the inputs are not
    autocast, `x * rsqrt(mean(x**2) + epsilon) * scale` is computed in float32
    and the result is cast to the compute dtype.

    The default `epsilon` is `FLOAT16_SAFE_EPSILON = 2**-14` (about 6.1e-5), the
    smallest normal float16 number: exact in float16 and not flushed to zero by
    FTZ arithmetic, where Keras' default 1e-6 is a float16 subnormal. It changes
    a unit-scale activation's RMS by under 2**-15, below float16's resolution.
    Any finite `epsilon > 0` is accepted and is added in float32.

    Args:
        axis: Integer or list of integers, the axes to normalise over.
        epsilon: Finite number > 0 added to the mean square.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Example:

        keras.config.set_dtype_policy("mixed_float16")
        y = tfmp.layers.RMSNormalization()(np.array([[7e4, 1.0, 2.0, 3.0]], "float32"))
        # y is float16 and finite: [[2.0, 2.9e-5, 5.7e-5, 8.6e-5]]
    """

    def __init__(self, axis=-1, epsilon: float = FLOAT16_SAFE_EPSILON, **kwargs):
        super().__init__(axis=axis, epsilon=_check_epsilon(epsilon), **kwargs)
        self.autocast = False

    def build(self, input_shape):
        if isinstance(self.axis, (list, tuple)):
            self.axis = sorted(self.axis)
            shape = tuple(input_shape[dim] for dim in self.axis)
        else:
            shape = (input_shape[self.axis],)
            self.axis = [self.axis]
        self.scale = self.add_weight(name="scale", shape=shape, initializer="ones", autocast=False)
        self.built = True

    def call(self, x):
        outputs = ops.rms_normalization(
            ops.cast(x, "float32"),
            scale=ops.cast(self.scale, "float32"),
            axis=self.axis,
            epsilon=self.epsilon,
        )
        return ops.cast(outputs, self.compute_dtype)
