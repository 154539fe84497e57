"""Tests for tfmp.layers: float32 where float16 fails, compute dtype elsewhere."""

import copy
import os
import tempfile

import keras
import numpy as np
from absl.testing import parameterized
from keras import ops

import tfmp
from tests.base import BACKEND, TestCase
from tfmp import layers as tfmp_layers
from tfmp import losses as tfmp_losses


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _dtype(x):
    return keras.backend.standardize_dtype(x.dtype)


def _softmax64(x, axis=-1):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class SoftmaxTest(TestCase):
    def test_float16_logits_give_float32_probabilities(self):
        keras.config.set_dtype_policy("mixed_float16")
        logits = ops.cast([[0.0, -20.0, -5.0]], "float16")
        expected = _softmax64([[0.0, -20.0, -5.0]])
        stock = keras.layers.Softmax()(logits)
        ours = tfmp_layers.Softmax()(logits)
        # Stock: float16, exp(-20) ~ 2e-9 is below float16's smallest subnormal.
        self.assertEqual(_dtype(stock), "float16")
        self.assertEqual(_np(stock)[0, 1], 0.0)
        self.assertEqual(_dtype(ours), "float32")
        self.assertAllClose(ours, expected, rtol=1e-5, atol=0)

    def test_output_is_float32_in_a_mixed_model(self):
        keras.config.set_dtype_policy("mixed_float16")
        inputs = keras.Input((4,))
        logits = keras.layers.Dense(3)(inputs)
        outputs = tfmp_layers.Softmax()(logits)
        model = keras.Model(inputs, outputs)
        self.assertEqual(_dtype(logits), "float16")
        self.assertEqual(_dtype(model.outputs[0]), "float32")
        self.assertEqual(_dtype(model(np.ones((2, 4), "float32"))), "float32")

    def test_mask(self):
        keras.config.set_dtype_policy("mixed_float16")
        logits = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]], "float32")
        mask = np.array([[True, False, True, False], [False, False, False, False]])
        out = _np(tfmp_layers.Softmax()(ops.cast(logits, "float16"), mask=mask))
        self.assertEqual(out.dtype, np.float32)
        self.assertAllClose(out[0, [0, 2]], _softmax64(logits[0, [0, 2]]), rtol=1e-6)
        self.assertAllClose(out[0, [1, 3]], [0.0, 0.0], atol=0)
        self.assertAllClose(out[1], np.zeros(4), atol=0)  # fully masked row

    def test_rejects_16_bit_dtype(self):
        with self.assertRaisesRegex(ValueError, r"`dtype` must compute in float32.*mixed_float16"):
            tfmp_layers.Softmax(dtype="mixed_float16")


class OutputHeadTest(TestCase):
    def test_float32_output_and_float16_matmul(self):
        keras.config.set_dtype_policy("mixed_float16")
        inputs = keras.Input((4,))
        head = tfmp_layers.OutputHead(3)
        outputs = head(keras.layers.Dense(8)(inputs))
        model = keras.Model(inputs, outputs)
        self.assertEqual(head.compute_dtype, "float16")
        self.assertEqual(head.kernel.dtype, "float32")
        self.assertEqual(head.bias.dtype, "float32")
        self.assertEqual(_dtype(model.outputs[0]), "float32")
        y = model(np.random.rand(2, 4).astype("float32"))
        self.assertEqual(_dtype(y), "float32")
        self.assertAllClose(_np(y).sum(axis=-1), [1.0, 1.0], rtol=1e-6)

    def test_stock_float16_head_underflows(self):
        keras.config.set_dtype_policy("mixed_float16")
        x = np.array([[20.0, 0.0]], "float32")
        stock = keras.layers.Dense(2, activation="softmax", kernel_initializer="identity")
        ours = tfmp_layers.OutputHead(2, kernel_initializer="identity")
        expected = _softmax64([[20.0, 0.0]])
        self.assertEqual(_np(stock(x))[0, 1], 0.0)
        self.assertAllClose(ours(x), expected, rtol=1e-5, atol=0)

    def test_logits_reach_stock_loss(self):
        # The float32 head keeps the logits, so even Keras' own loss object is exact.
        keras.config.set_dtype_policy("mixed_float16")
        x, y = np.array([[20.0, 0.0]], "float32"), np.array([1])
        expected = -np.log(_softmax64([[20.0, 0.0]])[0, 1])
        inputs = keras.Input((2,))
        # On TensorFlow the float32 head's output carries its logits
        # (`_keras_logits`). JAX and PyTorch arrays carry none: there Keras' loss
        # clips p = 2e-9 to 1e-7 even in float32, so the head matches float32.
        for head, close_to_exact in (
            (keras.layers.Dense(2, activation="softmax", kernel_initializer="identity"), False),
            (tfmp_layers.OutputHead(2, kernel_initializer="identity"), BACKEND == "tensorflow"),
        ):
            model = keras.Model(inputs, head(inputs))
            model.compile(loss=keras.losses.SparseCategoricalCrossentropy())
            loss = model.evaluate(x, y, verbose=0)
            self.assertEqual(abs(loss - expected) < 1e-3, close_to_exact, f"{head}: {loss}")

    def test_linear_activation_gives_float32_logits(self):
        keras.config.set_dtype_policy("mixed_float16")
        head = tfmp_layers.OutputHead(2, activation=None, kernel_initializer="ones")
        y = head(np.array([[0.5, 0.25]], "float32"))
        self.assertEqual(_dtype(y), "float32")
        self.assertAllClose(y, [[0.75, 0.75]])

    def test_rejects_bad_units(self):
        with self.assertRaisesRegex(ValueError,
                                    r"^`units` must be an integer >= 1. Received: units=0$"):
            tfmp_layers.OutputHead(0)


def _mha_weights():
    eye = np.eye(4, dtype="float32")
    return [eye.reshape(4, 1, 4)] * 3 + [eye.reshape(1, 4, 4)]


def _mha(cls, policy):
    keras.config.set_dtype_policy(policy)
    layer = cls(num_heads=1, key_dim=4, use_bias=False)
    x = np.zeros((1, 3, 4), "float32")
    layer(x, x)
    layer.set_weights(_mha_weights())
    return layer


class MultiHeadAttentionTest(TestCase):
    # Every row's dot product with itself is 2 * 260**2 = 135200; scaled by
    # 1/sqrt(4) the logit is 67600 > 65504, so in float16 it is inf.
    X = np.array([[[260, 260, 0, 0], [0, 0, 260, 260], [260, 0, 260, 0]]], "float32")

    def test_large_logits(self):
        reference, scores_ref = _mha(keras.layers.MultiHeadAttention, "float32")(
            self.X, self.X, return_attention_scores=True
        )
        stock = _mha(keras.layers.MultiHeadAttention, "mixed_float16")(self.X, self.X)
        # Keras' JAX and PyTorch attention (jax.nn.dot_product_attention,
        # F.scaled_dot_product_attention) keep the logits finite: the stock
        # failure exists on TensorFlow only.
        self.assertEqual(np.all(np.isfinite(_np(stock))), BACKEND != "tensorflow")
        ours = _mha(tfmp_layers.MultiHeadAttention, "mixed_float16")
        out, scores = ours(self.X, self.X, return_attention_scores=True)
        self.assertEqual(_dtype(out), "float16")
        self.assertEqual(_dtype(scores), "float32")
        self.assertEqual(ours._query_dense.compute_dtype, "float16")
        self.assertAllFinite([out, scores])
        self.assertAllClose(out, reference, rtol=1e-3, atol=1e-3)
        self.assertAllClose(scores, scores_ref, rtol=1e-5, atol=1e-6)
        self.assertAllClose(ours(self.X, self.X), reference, rtol=1e-3, atol=1e-3)

    def test_causal_and_attention_mask(self):
        x = np.random.rand(2, 4, 4).astype("float32")
        mask = np.array([[1, 1, 1, 0]] * 4 + [[1, 1, 1, 1]] * 4, bool).reshape(2, 4, 4)
        reference = _mha(keras.layers.MultiHeadAttention, "float32")
        ref_out, ref_scores = reference(
            x, x, attention_mask=mask, use_causal_mask=True, return_attention_scores=True
        )
        ours = _mha(tfmp_layers.MultiHeadAttention, "mixed_float16")
        out, scores = ours(
            x, x, attention_mask=mask, use_causal_mask=True, return_attention_scores=True
        )
        self.assertAllClose(np.triu(_np(scores)[0, 0], k=1), np.zeros((4, 4)), atol=0)
        self.assertAllClose(_np(scores)[0, 0, 3, 3], 0.0, atol=0)
        self.assertAllClose(scores, ref_scores, rtol=1e-2, atol=2e-3)
        self.assertAllClose(out, ref_out, rtol=1e-2, atol=2e-3)

    def test_symbolic_dtypes(self):
        keras.config.set_dtype_policy("mixed_float16")
        q = keras.Input((5, 8))
        out, scores = tfmp_layers.MultiHeadAttention(2, 4)(q, q, return_attention_scores=True)
        self.assertEqual((_dtype(out), _dtype(scores)), ("float16", "float32"))

    def test_rejects_flash_attention(self):
        with self.assertRaisesRegex(ValueError, r"`flash_attention` is not supported.*True"):
            tfmp_layers.MultiHeadAttention(2, 4, flash_attention=True)


class NormalizationTest(TestCase):
    X = np.array([[70000.0, 1.0, 2.0, 3.0]], "float32")  # 70000 > float16's 65504

    def test_layer_normalization_large_value(self):
        # Keras 3.15's own LayerNormalization also gets this right (it does not
        # autocast its inputs); this pins the same behaviour for tfmp's layer.
        keras.config.set_dtype_policy("mixed_float16")
        x64 = self.X.astype(np.float64)
        expected = (x64 - x64.mean()) / np.sqrt(x64.var() + 1e-3)
        ours = tfmp_layers.LayerNormalization()(self.X)
        self.assertEqual(_dtype(ours), "float16")
        self.assertAllClose(ours, expected, rtol=1e-3, atol=1e-3)

    def test_layer_normalization_float16_input_statistics(self):
        # Finite float16 inputs whose sum of squares (7.2e9) would overflow
        # float16 statistics.
        keras.config.set_dtype_policy("mixed_float16")
        x = np.array([[60000.0, -60000.0, 0.0, 0.0]], "float32")
        ours = tfmp_layers.LayerNormalization()(ops.cast(x, "float16"))
        self.assertAllClose(ours, [[1.4142, -1.4142, 0.0, 0.0]], rtol=1e-3, atol=1e-3)

    def test_rms_normalization_large_value(self):
        keras.config.set_dtype_policy("mixed_float16")
        x64 = self.X.astype(np.float64)
        expected = x64 / np.sqrt(np.mean(x64**2) + tfmp_layers.FLOAT16_SAFE_EPSILON)
        stock = keras.layers.RMSNormalization()(self.X)
        self.assertFalse(np.all(np.isfinite(_np(stock))))  # input autocast to float16: inf
        ours = tfmp_layers.RMSNormalization()(self.X)
        self.assertEqual(_dtype(ours), "float16")
        self.assertAllClose(ours, expected, rtol=1e-3, atol=1e-6)

    def test_rms_normalization_scale_is_float32(self):
        keras.config.set_dtype_policy("mixed_float16")
        layer = tfmp_layers.RMSNormalization()
        layer.build((None, 4))
        layer.scale.assign(np.full((4,), 70000.0, "float32"))
        # Unlike Keras' layer, the scale is not rounded (or overflowed) to float16
        # before use: a tiny input times a huge scale is finite.
        y = layer(np.full((1, 4), 1e-3, "float32"))
        self.assertAllClose(y, np.full((1, 4), 1e-3 / np.sqrt(1e-6 + 2.0**-14) * 7e4), rtol=1e-3)
        stock = keras.layers.RMSNormalization()
        stock.build((None, 4))
        stock.scale.assign(np.full((4,), 70000.0, "float32"))
        self.assertFalse(np.all(np.isfinite(_np(stock(np.full((1, 4), 1e-3, "float32"))))))

    def test_default_epsilon_is_a_normal_float16(self):
        eps = tfmp_layers.RMSNormalization().epsilon
        self.assertEqual(float(np.float16(eps)), eps)  # exact in float16
        self.assertGreaterEqual(eps, float(np.finfo(np.float16).tiny))  # not subnormal
        keras_eps = keras.layers.RMSNormalization().epsilon
        self.assertLess(keras_eps, float(np.finfo(np.float16).tiny))
        keras.config.set_dtype_policy("mixed_float16")
        y = tfmp_layers.RMSNormalization()(np.zeros((1, 4), "float32"))
        self.assertAllClose(y, np.zeros((1, 4)), atol=0)

    @parameterized.named_parameters(
        ("layer_norm_zero", tfmp_layers.LayerNormalization, 0.0),
        ("layer_norm_negative", tfmp_layers.LayerNormalization, -1e-3),
        ("rms_norm_inf", tfmp_layers.RMSNormalization, float("inf")),
        ("rms_norm_string", tfmp_layers.RMSNormalization, "1e-5"),
    )
    def test_rejects_bad_epsilon(self, cls, epsilon):
        with self.assertRaisesRegex(ValueError, r"`epsilon` must be a finite number > 0"):
            cls(epsilon=epsilon)


class Float32Test(TestCase):
    def test_wrapped_layer_runs_in_float32_and_casts_back(self):
        keras.config.set_dtype_policy("mixed_float16")
        x = np.array([[300.0, 400.0]], "float32")  # 300**2 + 400**2 > 65504
        stock = keras.layers.UnitNormalization()(x)
        self.assertAllClose(stock, [[0.0, 0.0]], atol=0)  # the norm overflowed
        layer = tfmp_layers.Float32(keras.layers.UnitNormalization())
        y = layer(x)
        self.assertEqual(layer.layer.compute_dtype, "float32")
        self.assertEqual(_dtype(y), "float16")
        self.assertAllClose(y, [[0.6, 0.8]], rtol=1e-3)

    def test_output_dtype_float32(self):
        keras.config.set_dtype_policy("mixed_float16")
        x = np.array([[12.0]], "float32")  # exp(12) = 162755 > 65504
        self.assertFalse(np.isfinite(_np(keras.layers.Activation("exponential")(x))[0, 0]))
        layer = tfmp_layers.Float32(keras.layers.Activation("exponential"), output_dtype="float32")
        y = layer(x)
        self.assertEqual(_dtype(y), "float32")
        self.assertAllClose(y, np.exp([[12.0]]), rtol=1e-6)

    def test_nested_layers_get_float32(self):
        keras.config.set_dtype_policy("mixed_float16")
        mha = keras.layers.MultiHeadAttention(num_heads=1, key_dim=4, use_bias=False)
        wrapped = tfmp_layers.Float32(mha)
        x = np.random.rand(1, 3, 4).astype("float32")
        y = wrapped(x, x)
        self.assertEqual(mha._query_dense.compute_dtype, "float32")
        self.assertEqual(_dtype(y), "float16")
        keras.config.set_dtype_policy("float32")
        reference = keras.layers.MultiHeadAttention(num_heads=1, key_dim=4, use_bias=False)
        reference(x, x)
        reference.set_weights(mha.get_weights())
        self.assertAllClose(y, reference(x, x), rtol=1e-3, atol=1e-3)

    def test_training_and_mask_with_integer_inputs(self):
        keras.config.set_dtype_policy("mixed_float16")
        dropout = tfmp_layers.Float32(keras.layers.Dropout(0.5))
        ones = np.ones((1, 64), "float32")
        self.assertAllClose(dropout(ones, training=False), ones, atol=0)
        self.assertIn(0.0, _np(dropout(ones, training=True)))
        embedding = keras.layers.Embedding(5, 2, mask_zero=True)
        inputs = keras.Input((3,), dtype="int32")
        pooled = keras.layers.GlobalAveragePooling1D()(tfmp_layers.Float32(embedding)(inputs))
        table = _np(embedding.embeddings)
        y = keras.Model(inputs, pooled)(np.array([[1, 2, 0]]))
        self.assertEqual(embedding.compute_dtype, "float32")
        # The pooling saw the embedding's mask: the padding row is left out.
        self.assertAllClose(y, [(table[1] + table[2]) / 2], rtol=1e-3, atol=1e-4)

    @parameterized.named_parameters(
        ("not_a_layer", lambda: "dense", None, r"`layer` must be a `keras.layers.Layer`"),
        ("bad_output_dtype", lambda: keras.layers.Dense(2), "int8", r"`output_dtype`.*'int8'"),
    )
    def test_rejects_bad_arguments(self, make_layer, output_dtype, message):
        with self.assertRaisesRegex(ValueError, message):
            tfmp_layers.Float32(make_layer(), output_dtype=output_dtype)

    def test_rejects_layer_built_in_float16(self):
        layer = keras.layers.Dense(2, dtype="float16")
        layer.build((None, 2))
        with self.assertRaisesRegex(ValueError, r"already holds float16 weights"):
            tfmp_layers.Float32(layer)


def _model(name):
    """A tiny model under mixed_float16 holding the layer under test."""
    inputs = keras.Input((3, 4))
    x = keras.layers.Dense(4)(inputs)
    if name == "softmax":
        x = tfmp_layers.Softmax()(x)
    elif name == "output_head":
        x = tfmp_layers.OutputHead(3)(x)
    elif name == "multi_head_attention":
        x = tfmp_layers.MultiHeadAttention(num_heads=2, key_dim=2)(x, x)
    elif name == "layer_normalization":
        x = tfmp_layers.LayerNormalization(epsilon=1e-4)(x)
    elif name == "rms_normalization":
        x = tfmp_layers.RMSNormalization()(x)
    elif name == "float32":
        x = tfmp_layers.Float32(keras.layers.UnitNormalization(), output_dtype="float32")(x)
    return keras.Model(inputs, x)


_LAYER_NAMES = (
    "softmax", "output_head", "multi_head_attention", "layer_normalization",
    "rms_normalization", "float32",
)


class SerializationTest(TestCase):
    @parameterized.named_parameters((n, n) for n in _LAYER_NAMES)
    def test_config_round_trip(self, name):
        keras.config.set_dtype_policy("mixed_float16")
        layer = _model(name).layers[-1]
        config = layer.get_config()
        clone = type(layer).from_config(copy.deepcopy(config))  # Wrapper pops `layer`
        self.assertEqual(clone.get_config(), config)
        serialized = keras.saving.serialize_keras_object(layer)
        restored = keras.saving.deserialize_keras_object(serialized)
        self.assertIsInstance(restored, type(layer))

    @parameterized.named_parameters((n, n) for n in _LAYER_NAMES)
    def test_keras_file_round_trip(self, name):
        keras.config.set_dtype_policy("mixed_float16")
        model = _model(name)
        x = np.random.rand(2, 3, 4).astype("float32")
        expected = model(x)
        path = os.path.join(tempfile.mkdtemp(), "model.keras")
        model.save(path)
        keras.config.set_dtype_policy("float32")  # the file carries the policies
        loaded = keras.saving.load_model(path, safe_mode=True)
        self.assertIsInstance(loaded.layers[-1], type(model.layers[-1]))
        actual = loaded(x)
        self.assertEqual(_dtype(actual), _dtype(expected))
        self.assertAllClose(actual, expected, rtol=1e-6, atol=1e-6)


class FitTest(TestCase):
    def test_fit_with_loss_scale_optimizer(self):
        keras.config.set_dtype_policy("mixed_float16")
        inputs = keras.Input((4, 8))
        x = tfmp_layers.MultiHeadAttention(num_heads=2, key_dim=4)(inputs, inputs)
        x = tfmp_layers.LayerNormalization()(x + keras.layers.Dense(8)(inputs))
        x = tfmp_layers.RMSNormalization()(keras.layers.Dense(8, activation="relu")(x))
        x = tfmp_layers.Float32(keras.layers.UnitNormalization())(x)
        outputs = tfmp_layers.OutputHead(3)(keras.layers.GlobalAveragePooling1D()(x))
        model = keras.Model(inputs, outputs)
        optimizer = tfmp.LossScaleOptimizer(keras.optimizers.Adam(1e-2))
        model.compile(optimizer=optimizer, loss=tfmp_losses.SparseCategoricalCrossentropy())
        x_train = np.random.rand(16, 4, 8).astype("float32") * 100.0
        y_train = np.random.randint(0, 3, size=(16,))
        history = model.fit(x_train, y_train, batch_size=8, epochs=2, verbose=0)
        self.assertAllFinite(np.array(history.history["loss"]))
        self.assertAllFinite(model.trainable_weights)
        self.assertEqual(_dtype(model(x_train[:2])), "float32")
