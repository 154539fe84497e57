"""Tests for tfmp.losses: float32 losses, from the logits a float16 softmax kept."""

import os
import tempfile

import keras
import numpy as np
from absl.testing import parameterized
from keras import ops

from tests.base import BACKEND, TestCase, requires_tensorflow, tf
from tfmp import losses as tfmp_losses

# Logits whose true-class log-probability is about -20: the probability,
# 2e-9, is below float16's smallest subnormal (6e-8) and rounds to 0.
X = np.array([[20.0, 0.0]], "float32")


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _dtype(x):
    return keras.backend.standardize_dtype(x.dtype)


def _exact(kind):
    """The float64 loss of the models below on `X`."""
    logits = X[0].astype(np.float64)
    if kind == "binary":  # sigmoid(-20) for a positive label
        return float(np.logaddexp(0.0, 20.0))
    return float(np.logaddexp(*logits) - logits[1])


def _head_model(kind, policy):
    """A one-layer classifier with a Keras (stock) softmax or sigmoid head."""
    keras.config.set_dtype_policy(policy)
    inputs = keras.Input((2,))
    if kind == "binary":
        head = keras.layers.Dense(
            1, activation="sigmoid", kernel_initializer=keras.initializers.Constant([[-1.0], [0.0]])
        )
    else:
        head = keras.layers.Dense(2, activation="softmax", kernel_initializer="identity")
    return keras.Model(inputs, head(inputs))


_LABELS = {
    "sparse": np.array([1]),
    "categorical": np.array([[0.0, 1.0]], "float32"),
    "binary": np.array([[1.0]], "float32"),
}
_STOCK = {
    "sparse": keras.losses.SparseCategoricalCrossentropy,
    "categorical": keras.losses.CategoricalCrossentropy,
    "binary": keras.losses.BinaryCrossentropy,
}
_OURS = {
    "sparse": tfmp_losses.SparseCategoricalCrossentropy,
    "categorical": tfmp_losses.CategoricalCrossentropy,
    "binary": tfmp_losses.BinaryCrossentropy,
}
_OUR_FNS = {
    "sparse": tfmp_losses.sparse_categorical_crossentropy,
    "categorical": tfmp_losses.categorical_crossentropy,
    "binary": tfmp_losses.binary_crossentropy,
}
_STOCK_FNS = {
    "sparse": keras.losses.sparse_categorical_crossentropy,
    "categorical": keras.losses.categorical_crossentropy,
    "binary": keras.losses.binary_crossentropy,
}
_KINDS = (("sparse", "sparse"), ("categorical", "categorical"), ("binary", "binary"))


class CrossentropyFromFloat16HeadTest(TestCase):
    @parameterized.named_parameters(*_KINDS)
    @requires_tensorflow  # Under JAX's jit the traced outputs carry no `_keras_logits`.
    def test_evaluate(self, kind):
        exact = _exact(kind)
        model = _head_model(kind, "mixed_float16")
        self.assertEqual(_dtype(model.outputs[0]), "float16")
        model.compile(loss=_STOCK[kind]())
        stock = model.evaluate(X, _LABELS[kind], verbose=0)
        # Keras casts to float32, loses the logits, clips the 0 to 1e-7: ~16 nats.
        self.assertGreater(abs(stock - exact), 3.0)
        model.compile(loss=_OURS[kind]())
        self.assertAllClose(model.evaluate(X, _LABELS[kind], verbose=0), exact, atol=1e-3)

    def test_stock_value_is_the_clipped_probability(self):
        # The 16.12 of the issue is -log(epsilon): the probability was clipped.
        model = _head_model("sparse", "mixed_float16")
        stock = keras.losses.SparseCategoricalCrossentropy()(_LABELS["sparse"], model(X))
        self.assertAllClose(stock, -np.log(keras.config.epsilon()), rtol=1e-5)

    @parameterized.named_parameters(*_KINDS)
    def test_bare_calls_return_float32(self, kind):
        exact = _exact(kind)
        model = _head_model(kind, "mixed_float16")
        y_pred = model(X)
        stock_fn = _STOCK_FNS[kind](_LABELS[kind], y_pred)
        # On JAX Keras' sparse_categorical_crossentropy already returns float32.
        stock_dtype = "float32" if (BACKEND, kind) == ("jax", "sparse") else "float16"
        self.assertEqual(_dtype(stock_fn), stock_dtype)
        for loss in (_OURS[kind]()(_LABELS[kind], y_pred), _OUR_FNS[kind](_LABELS[kind], y_pred)):
            self.assertEqual(_dtype(loss), "float32")
            self.assertAllClose(ops.mean(loss), exact, atol=1e-3)

    @parameterized.named_parameters(*_KINDS)
    @requires_tensorflow
    def test_gradient_tape_matches_float32(self, kind):
        def gradients(policy, loss_fn):
            model = _head_model(kind, policy)
            with tf.GradientTape() as tape:
                loss = loss_fn(_LABELS[kind], model(X))
            return loss, tape.gradient(loss, model.trainable_weights)

        ref_loss, ref_grads = gradients("float32", _STOCK[kind]())
        _, stock_grads = gradients("mixed_float16", _STOCK[kind]())
        # The clipped probability has no gradient: Keras' float16 head stops learning.
        self.assertAllClose(stock_grads[0], np.zeros_like(_np(stock_grads[0])), atol=0)
        for loss_fn in (_OURS[kind](), _OUR_FNS[kind]):
            loss, grads = gradients("mixed_float16", loss_fn)
            self.assertEqual(_dtype(loss), "float32")
            self.assertAllClose(ops.mean(loss), ref_loss, atol=1e-3)
            for g, ref in zip(grads, ref_grads, strict=True):
                self.assertAllClose(g, ref, rtol=1e-3, atol=1e-3)

    @requires_tensorflow
    def test_three_classes_in_a_tf_function(self):
        keras.config.set_dtype_policy("mixed_float16")
        logits = np.array([[20.0, 0.0, 1.0]], "float32")
        model = keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(3, activation="softmax",
                                                   kernel_initializer="identity")]
        )
        loss_fn = tfmp_losses.SparseCategoricalCrossentropy()
        loss = tf.function(lambda x: loss_fn(np.array([1]), model(x)))(logits)
        exact = np.logaddexp.reduce(logits[0].astype(np.float64)) - logits[0, 1]
        self.assertAllClose(loss, exact, atol=1e-3)

    def test_mask_is_kept(self):
        # A masked sequence: the loss must average over the unmasked steps only.
        def evaluate(policy, loss, mask_zero=True):
            keras.config.set_dtype_policy(policy)
            keras.utils.set_random_seed(1)
            inputs = keras.Input((3,), dtype="int32")
            x = keras.layers.Embedding(4, 2, mask_zero=mask_zero)(inputs)
            model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
            model.compile(loss=loss)
            return model.evaluate(np.array([[1, 2, 0]]), np.array([[1, 0, 1]]), verbose=0)

        reference = evaluate("float32", keras.losses.SparseCategoricalCrossentropy())
        unmasked = evaluate("float32", keras.losses.SparseCategoricalCrossentropy(), False)
        self.assertGreater(abs(reference - unmasked), 1e-3)
        ours = evaluate("mixed_float16", tfmp_losses.SparseCategoricalCrossentropy())
        self.assertAllClose(ours, reference, rtol=2e-3)


class Float32ComputationTest(TestCase):
    def test_mean_squared_error_overflow(self):
        y_true, y_pred = np.array([[0.0]], "float32"), ops.cast([[300.0]], "float16")
        stock = keras.losses.mean_squared_error(y_true, y_pred)  # 90000 > 65504
        self.assertEqual(_dtype(stock), "float16")
        self.assertFalse(np.isfinite(_np(stock)[0]))
        for loss in (
            tfmp_losses.mean_squared_error(y_true, y_pred),
            tfmp_losses.MeanSquaredError()(y_true, y_pred),
        ):
            self.assertEqual(_dtype(loss), "float32")
            self.assertAllClose(ops.mean(loss), 300.0**2, rtol=1e-6)

    @parameterized.named_parameters(
        ("sparse_from_logits", "sparse", {"from_logits": True}),
        ("sparse_ignore_class", "sparse", {"ignore_class": 0}),
        ("categorical_label_smoothing", "categorical", {"label_smoothing": 0.1}),
        ("categorical_from_logits", "categorical", {"from_logits": True}),
        ("binary_from_logits_label_smoothing", "binary",
         {"from_logits": True, "label_smoothing": 0.2}),
    )
    def test_arguments_match_keras_in_float32(self, kind, kwargs):
        rng = np.random.default_rng(0)
        logits = rng.normal(size=(4, 3)).astype("float32") * 4
        if kind == "sparse":
            y_true = np.array([0, 1, 2, 1])
        elif kind == "categorical":
            y_true = np.eye(3, dtype="float32")[[0, 1, 2, 1]]
        else:
            y_true = (rng.random((4, 3)) > 0.5).astype("float32")
        y_pred = logits if kwargs.get("from_logits") else _np(ops.softmax(logits))
        reference = _STOCK[kind](**kwargs)(y_true, y_pred)
        ours = _OURS[kind](**kwargs)(y_true, ops.cast(y_pred, "float16"))
        self.assertEqual(_dtype(ours), "float32")
        self.assertAllClose(ours, reference, rtol=5e-3, atol=1e-3)

    @parameterized.named_parameters(
        ("mixed_float16", "mixed_float16"), ("float16", "float16"), ("bfloat16", "bfloat16"),
    )
    def test_rejects_16_bit_dtype(self, dtype):
        for cls in (*_OURS.values(), tfmp_losses.MeanSquaredError):
            with self.assertRaisesRegex(ValueError, rf"`dtype` must be None or a float32.*{dtype}"):
                cls(dtype=dtype)

    def test_float32_under_a_16_bit_floatx(self):
        keras.config.set_floatx("float16")
        try:
            loss = tfmp_losses.MeanSquaredError()
            stock = keras.losses.MeanSquaredError()
        finally:
            keras.config.set_floatx("float32")
        self.assertEqual(stock.dtype, "float16")
        self.assertEqual(loss.dtype, "float32")


_CLASSES = (
    ("sparse", tfmp_losses.SparseCategoricalCrossentropy, {"ignore_class": 2}),
    ("sparse_smoothed", tfmp_losses.SparseCategoricalCrossentropy, {"label_smoothing": 0.1}),
    ("categorical", tfmp_losses.CategoricalCrossentropy, {"label_smoothing": 0.1}),
    ("binary", tfmp_losses.BinaryCrossentropy, {"from_logits": True, "axis": 1}),
    ("mse", tfmp_losses.MeanSquaredError, {"reduction": "sum"}),
)


class LabelSmoothingTest(TestCase):
    LOGITS = np.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]], "float32")
    LABELS = np.array([0, 2])

    def _hand_computed(self, smoothing):
        z = self.LOGITS.astype(np.float64)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        targets = np.full(z.shape, smoothing / 3)
        targets[np.arange(2), self.LABELS] += 1 - smoothing
        return -(targets * log_p).sum(axis=1)

    @parameterized.named_parameters(("function", False), ("object", True))
    def test_sparse_smoothing_matches_the_hand_computed_value(self, as_object):
        if as_object:
            loss = tfmp_losses.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.1,
                                                             reduction=None)
        else:
            def loss(y, p):
                return tfmp_losses.sparse_categorical_crossentropy(
                    y, p, from_logits=True, label_smoothing=0.1)
        value = loss(self.LABELS, self.LOGITS)
        self.assertEqual(_dtype(value), "float32")
        self.assertAllClose(value, self._hand_computed(0.1), rtol=1e-5)
        self.assertAllClose(tfmp_losses.sparse_categorical_crossentropy(
            self.LABELS, self.LOGITS, from_logits=True), self._hand_computed(0.0), rtol=1e-5)

    def test_from_a_float16_softmax_head_uses_the_logits(self):
        keras.config.set_dtype_policy("mixed_float16")
        probs = keras.activations.softmax(ops.cast(self.LOGITS, "float16"))
        value = tfmp_losses.sparse_categorical_crossentropy(self.LABELS[:, None], probs,
                                                            label_smoothing=0.1)
        self.assertAllClose(value, self._hand_computed(0.1), rtol=2e-3)

    def test_ignored_class_has_no_loss(self):
        value = tfmp_losses.sparse_categorical_crossentropy(
            self.LABELS, self.LOGITS, from_logits=True, ignore_class=2, label_smoothing=0.1)
        self.assertAllClose(value, [self._hand_computed(0.1)[0], 0.0], rtol=1e-5)

    @parameterized.named_parameters(("negative", -0.1), ("above_one", 1.5), ("bool", True))
    def test_bad_label_smoothing(self, value):
        with self.assertRaisesRegex(ValueError, r"`label_smoothing` must be a number in \[0, 1\]"):
            tfmp_losses.SparseCategoricalCrossentropy(label_smoothing=value)


class SerializationTest(TestCase):
    @parameterized.named_parameters(*_CLASSES)
    def test_config_round_trip(self, cls, kwargs):
        loss = cls(**kwargs)
        config = loss.get_config()
        for key, value in kwargs.items():
            self.assertEqual(config[key], value)
        self.assertEqual(cls.from_config(config).get_config(), config)
        restored = keras.losses.deserialize(keras.losses.serialize(loss))
        self.assertIsInstance(restored, cls)
        self.assertEqual(restored.get_config(), config)

    @parameterized.named_parameters(
        ("object", tfmp_losses.SparseCategoricalCrossentropy()),
        ("function", tfmp_losses.sparse_categorical_crossentropy),
    )
    def test_keras_file_round_trip(self, loss):
        model = _head_model("sparse", "mixed_float16")
        model.compile(optimizer="sgd", loss=loss)
        expected = model.evaluate(X, _LABELS["sparse"], verbose=0)
        path = os.path.join(tempfile.mkdtemp(), "model.keras")
        model.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
        if isinstance(loss, keras.losses.Loss):
            self.assertIsInstance(loaded.loss, tfmp_losses.SparseCategoricalCrossentropy)
        else:
            self.assertIs(loaded.loss, tfmp_losses.sparse_categorical_crossentropy)
        self.assertAllClose(loaded.evaluate(X, _LABELS["sparse"], verbose=0), expected)
