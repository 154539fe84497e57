"""Float32-safe layers: the numerically sensitive parts of a mixed precision model.

Under `mixed_float16` most layers compute in float16. These layers keep in
float32 what float16 cannot hold (largest finite 65504, smallest normal
2**-14): softmax, attention logits, normalisation statistics and the model's
outputs. They are drop-ins for the Keras layers of the same name, written with
`keras.ops` (every backend), and registered for `.keras` saving under the
`"tfmp"` package.

| layer | computes in | returns |
|---|---|---|
| `Softmax` | float32 | float32 (carries `_keras_logits`, unmasked) |
| `OutputHead` | matmul in the compute dtype, bias and activation in float32 | float32 |
| `MultiHeadAttention` | projections: compute dtype; logits, softmax: float32 | compute dtype |
| `LayerNormalization`, `RMSNormalization` | float32 statistics, float32 weights | compute dtype |
| `Float32(layer)` | the wrapped layer in float32 | the compute dtype, or `output_dtype` |

The normalisation layers (and `FLOAT16_SAFE_EPSILON`) live in `tfmp.normalization`
and are re-exported here.

Example:

    keras.config.set_dtype_policy("mixed_float16")
    inputs = keras.Input((16, 32))
    x = tfmp.layers.MultiHeadAttention(num_heads=2, key_dim=16)(inputs, inputs)
    x = tfmp.layers.LayerNormalization()(x + inputs)
    outputs = tfmp.layers.OutputHead(10)(keras.layers.GlobalAveragePooling1D()(x))
    model = keras.Model(inputs, outputs)       # outputs: float32 probabilities
"""

from __future__ import annotations

import inspect

import keras
from keras import ops

from tfmp import _checks
from tfmp.normalization import FLOAT16_SAFE_EPSILON, LayerNormalization, RMSNormalization

_WIDE_FLOATS = ("float32", "float64")
_OUTPUT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _float32_policy(dtype, argument: str = "dtype"):
    """The dtype policy for a layer that must compute in float32 (or float64)."""
    policy = keras.dtype_policies.get("float32" if dtype is None else dtype)
    if policy.compute_dtype not in _WIDE_FLOATS:
        raise ValueError(
            f"`{argument}` must compute in float32 or float64: this layer exists to keep "
            f"its computation out of {policy.compute_dtype}. Received: {argument}={dtype!r}"
        )
    return policy


def _is_float_tensor(x) -> bool:
    return (
        (ops.is_tensor(x) or keras.backend.is_keras_tensor(x))
        and keras.backend.is_float_dtype(keras.backend.standardize_dtype(x.dtype))
    )


def _cast_floats(structure, dtype: str):
    """Casts every floating tensor in a nested structure to `dtype`."""

    def cast(x):
        if not _is_float_tensor(x) or keras.backend.standardize_dtype(x.dtype) == dtype:
            return x
        return ops.cast(x, dtype)

    return keras.tree.map_structure(cast, structure)


def _float32_softmax(logits, mask=None, axis=-1):
    """Softmax of `logits` in float32; entries where `mask` is False get 0.

    Masked logits are set to -1e9 (float32), and a slice with every entry
    masked returns zeros, as in `keras.layers.Softmax`.
    """
    x = ops.cast(logits, "float32")
    if mask is not None:
        mask = ops.convert_to_tensor(mask)
        if keras.backend.standardize_dtype(mask.dtype) != "bool":
            mask = ops.greater(mask, ops.cast(0.5, mask.dtype))
        x = ops.where(mask, x, -1e9)
    if isinstance(axis, (list, tuple)) and len(axis) > 1:
        outputs = ops.exp(x - ops.logsumexp(x, axis=axis, keepdims=True))
    else:
        outputs = keras.activations.softmax(
            x, axis=axis[0] if isinstance(axis, (list, tuple)) else axis
        )
    if mask is not None:
        outputs = ops.where(mask, outputs, 0.0)
    return outputs


@keras.saving.register_keras_serializable(package="tfmp")
class Softmax(keras.layers.Softmax):
    """`keras.layers.Softmax` that computes and returns float32 under any policy.

    A float16 softmax underflows every probability below 2**-24 (about 6e-8) to
    0 and rounds the rest to 11 significant bits; a loss computed from it is
    wrong by up to several nats. This layer always runs with a float32 dtype
    policy: its inputs are cast to float32, masked entries get -1e9 (not
    float16's -3e4) and then 0. Use it as the last layer of a classifier.

    Args:
        axis: Integer, or list of integers, axis along which to normalise.
        dtype: Optional dtype policy; it must compute in float32 or float64.
            Defaults to `"float32"` whatever the global policy.
        **kwargs: Other base layer keyword arguments (`name`, ...).

    Call arguments:
        inputs: The logits, in any float dtype.
        mask: Optional boolean mask broadcastable to `inputs` (True keeps).

    Returns:
        Float32 probabilities shaped like `inputs`.

    Example:

        keras.config.set_dtype_policy("mixed_float16")
        logits = keras.layers.Dense(10)(keras.Input((4,)))   # float16
        probs = tfmp.layers.Softmax()(logits)                 # float32
    """

    def __init__(self, axis=-1, dtype=None, **kwargs):
        super().__init__(axis=axis, dtype=_float32_policy(dtype), **kwargs)


@keras.saving.register_keras_serializable(package="tfmp")
class OutputHead(keras.layers.Layer):
    """A classification (or regression) head whose output is float32.

    `Dense(units)` followed by `activation`, where the matrix product runs in
    the layer's compute dtype (float16 under `mixed_float16`, for tensor-core
    speed, accumulated in float32 on GPUs) and the logits are cast to float32
    before the bias (a float32 weight, never rounded to float16) and the
    activation. The model's outputs are therefore float32: probabilities do not
    underflow, `model.export()` serves float32, and a `"softmax"` output keeps
    its float32 logits for Keras' and tfmp's cross-entropy losses.

    Args:
        units: Positive int, number of outputs (classes).
        activation: Activation applied in float32: `"softmax"` (default),
            `"sigmoid"`, `"linear"`/`None` for float32 logits, or any Keras
            activation.
        use_bias: Whether to add a (float32) bias.
        kernel_initializer: Initializer for the kernel.
        bias_initializer: Initializer for the bias.
        kernel_regularizer: Optional regularizer for the kernel.
        bias_regularizer: Optional regularizer for the bias.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Example:

        keras.config.set_dtype_policy("mixed_float16")
        inputs = keras.Input((32,))
        outputs = tfmp.layers.OutputHead(10)(keras.layers.Dense(64)(inputs))
        model = keras.Model(inputs, outputs)   # model.outputs[0].dtype == "float32"
    """

    def __init__(
        self,
        units: int,
        activation="softmax",
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        **kwargs,
    ):
        _checks.integer("units", units)
        super().__init__(**kwargs)
        self.units = units
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.supports_masking = True

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_shape[-1], self.units),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.units,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                autocast=False,
            )

    def call(self, inputs):
        logits = ops.cast(ops.matmul(inputs, self.kernel), "float32")
        if self.bias is not None:
            logits = ops.add(logits, ops.cast(self.bias, "float32"))
        return self.activation(logits)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update(
            units=self.units,
            activation=keras.activations.serialize(self.activation),
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer),
            bias_regularizer=keras.regularizers.serialize(self.bias_regularizer),
        )
        return config


@keras.saving.register_keras_serializable(package="tfmp")
class MultiHeadAttention(keras.layers.MultiHeadAttention):
    """`keras.layers.MultiHeadAttention` with float32 attention logits and softmax.

    The query, key, value and output projections run in the compute dtype
    (float16 under `mixed_float16`). The scaled dot products `q.k / sqrt(d)`
    and their softmax run in float32: in float16 a logit above 65504 is `inf`
    and the softmax returns NaN, and long sequences spread probability over
    entries float16 flushes to zero. The probabilities are cast back to the
    value's dtype for the weighted sum. Attention always takes this explicit
    path (no fused or flash kernel), so `flash_attention=True` is refused.

    Args:
        num_heads: Number of attention heads.
        key_dim: Size of each attention head for query and key.
        flash_attention: Must be `None` or `False`.
        **kwargs: Every other `keras.layers.MultiHeadAttention` argument
            (`value_dim`, `dropout`, `use_bias`, `output_shape`,
            `attention_axes`, initializers, ...).

    Returns (when called):
        The attention output in the compute dtype and, with
        `return_attention_scores=True`, the float32 attention probabilities.

    Example:

        keras.config.set_dtype_policy("mixed_float16")
        mha = tfmp.layers.MultiHeadAttention(num_heads=2, key_dim=8)
        x = keras.random.normal((2, 5, 16))
        y = mha(x, x)                      # float16, finite even for huge logits
    """

    def __init__(self, num_heads: int, key_dim: int, flash_attention=None, **kwargs):
        if flash_attention:
            raise ValueError(
                "`flash_attention` is not supported: tfmp's MultiHeadAttention computes the "
                "attention logits explicitly in float32; use keras.layers.MultiHeadAttention "
                "for a fused kernel. Received: flash_attention=True"
            )
        super().__init__(num_heads, key_dim, flash_attention=False, **kwargs)
        self._flash_attention = False

    def _build_attention(self, rank):
        super()._build_attention(rank)
        # The stock softmax layer computes in the compute dtype; keep its axes only.
        axes = self._softmax.axis
        self._softmax_axes = tuple(axes) if isinstance(axes, (list, tuple)) else (axes,)

    def _masked_softmax(self, attention_scores, attention_mask=None):
        if attention_mask is not None:
            # As in Keras: expand from the `num_heads` dimension onwards.
            expansion_axis = -len(self._attention_axes) * 2 - 1
            for _ in range(len(attention_scores.shape) - len(attention_mask.shape)):
                attention_mask = ops.expand_dims(attention_mask, axis=expansion_axis)
        axis = self._softmax_axes[0] if len(self._softmax_axes) == 1 else self._softmax_axes
        return _float32_softmax(attention_scores, attention_mask, axis=axis)

    def _compute_attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
        use_causal_mask=False,
    ):
        if use_causal_mask:
            causal_mask = self._compute_causal_mask(query, value)
            attention_mask = (
                causal_mask
                if attention_mask is None
                else ops.logical_and(ops.cast(attention_mask, "bool"), causal_mask)
            )
        query = ops.multiply(ops.cast(query, "float32"), self._inverse_sqrt_key_dim)
        scores = ops.einsum(self._dot_product_equation, ops.cast(key, "float32"), query)
        probs = self._masked_softmax(scores, attention_mask)  # float32
        dropped = self._dropout_layer(probs, training=training) if self._dropout > 0 else probs
        output = ops.einsum(self._combine_equation, ops.cast(dropped, value.dtype), value)
        return output, probs

    def compute_output_spec(self, query, value, key=None, *args, **kwargs):
        spec = super().compute_output_spec(query, value, key, *args, **kwargs)
        if isinstance(spec, tuple):
            output, scores = spec
            return output, keras.KerasTensor(scores.shape, dtype="float32")
        return spec


@keras.saving.register_keras_serializable(package="tfmp")
class Float32(keras.layers.Wrapper):
    """Runs any layer in float32 inside a mixed precision model.

    The wrapped layer (and every layer nested in it) gets a `"float32"` dtype
    policy, its floating inputs are cast to float32 (not through float16: the
    wrapper does not autocast), and its floating outputs are cast to
    `output_dtype`, by default the wrapper's own compute dtype, i.e. the
    surrounding policy's. Integer inputs and outputs are left alone.

    Args:
        layer: The `keras.layers.Layer` to run in float32. It must not already
            hold weights of another float dtype (wrap it before building it).
        output_dtype: `None` (cast back to the compute dtype) or one of
            `"float16"`, `"bfloat16"`, `"float32"`, `"float64"`; `"float32"`
            keeps the float32 result, e.g. for a model output.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Example:

        keras.config.set_dtype_policy("mixed_float16")
        norm = tfmp.layers.Float32(keras.layers.BatchNormalization())
        head = tfmp.layers.Float32(keras.layers.Dense(10), output_dtype="float32")
    """

    def __init__(self, layer, output_dtype: str | None = None, **kwargs):
        if not isinstance(layer, keras.layers.Layer):
            raise ValueError(
                f"`layer` must be a `keras.layers.Layer` instance. Received: layer={layer!r}"
            )
        if output_dtype is not None and output_dtype not in _OUTPUT_DTYPES:
            raise ValueError(
                f"`output_dtype` must be None or one of {', '.join(_OUTPUT_DTYPES)}. "
                f"Received: output_dtype={output_dtype!r}"
            )
        narrow = sorted(
            {
                v.dtype
                for v in layer.weights
                if keras.backend.is_float_dtype(v.dtype) and v.dtype not in _WIDE_FLOATS
            }
        )
        if narrow:
            raise ValueError(
                f"`layer` already holds {', '.join(narrow)} weights and cannot run in float32; "
                f"wrap it before it is built. Received: layer={layer.name!r}"
            )
        super().__init__(layer, **kwargs)
        for sublayer in layer._flatten_layers(include_self=True):
            sublayer.dtype_policy = "float32"
        self.output_dtype = output_dtype
        self.autocast = False
        self.supports_masking = True
        params = inspect.signature(layer.call).parameters
        self._forward_training = "training" in params
        self._forward_mask = "mask" in params

    def build(self, input_shape=None):
        # The wrapped layer builds itself on its first call, with the arguments
        # its own `build` expects (e.g. query and value shapes).
        pass

    def call(self, inputs, *args, training=None, mask=None, **kwargs):
        if self._forward_training:
            kwargs["training"] = training
        if self._forward_mask and mask is not None:
            kwargs["mask"] = mask
        outputs = self.layer(
            _cast_floats(inputs, "float32"),
            *_cast_floats(args, "float32"),
            **_cast_floats(kwargs, "float32"),
        )
        return _cast_floats(outputs, self.output_dtype or self.compute_dtype)

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask) if self.layer.supports_masking else None

    def get_config(self):
        config = super().get_config()
        config["output_dtype"] = self.output_dtype
        return config


__all__ = [
    "FLOAT16_SAFE_EPSILON", "Float32", "LayerNormalization", "MultiHeadAttention", "OutputHead",
    "RMSNormalization", "Softmax",
]
