"""Tests for tfmp.precision_guard: the layer that overflows moves to float32 during fit."""

import os

import keras
import numpy as np
from keras import ops

import tfmp
from tests.base import TestCase
from tfmp import callbacks, precision_guard


@keras.saving.register_keras_serializable(package="tfmp_test")
class Grow(keras.layers.Layer):
    """`x * 2**(rate * steps)`, `steps` counting training calls: passes 65504 after a while."""

    def __init__(self, rate: float = 0.25, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate

    def build(self, input_shape):
        self.steps = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                     name="steps")

    def call(self, x, training=False):
        # The gain of the steps so far: what the forward pass of a skipped step saw is
        # what the guard's (inference) probe sees, as with weights that have grown.
        gain = ops.power(2.0, self.rate * ops.cast(self.steps, "float32"))
        if training:
            self.steps.assign(self.steps + 1.0)
        return x * ops.cast(gain, x.dtype)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate}


@keras.saving.register_keras_serializable(package="tfmp_test")
class RowNormalize(keras.layers.Layer):
    """`x / max|x|` per example, in float32: undoes `Grow`'s gain."""

    def call(self, x):
        return x / (ops.max(ops.abs(x), axis=-1, keepdims=True) + 1e-30)


def _model(policy: str) -> keras.Model:
    with tfmp.policy_scope(policy):
        inputs = keras.Input((4,))
        h = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
        h = Grow(name="grow")(h)
        h = RowNormalize(dtype="float32", name="normalize")(h)
        outputs = keras.layers.Dense(1, dtype="float32", name="out")(h)
        model = keras.Model(inputs, outputs)
    model.compile(optimizer=tfmp.LossScaleOptimizer(keras.optimizers.Adam(0.02)), loss="mse")
    return model


def _data(n=256):
    """A learnable target plus noise (variance 0.04): the loss levels off near 0.04."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = np.tanh(x[:, :1] - x[:, 1:2]) + 0.2 * rng.normal(size=(n, 1))
    return x, y.astype("float32")


def _fit(model, extra=(), epochs=20):
    """16 steps an epoch: `Grow` passes 65504 in float16 near step 64 (2**16), never in
    float32 (2**80 after 320 steps)."""
    x, y = _data()
    keras.utils.set_random_seed(0)
    monitor = callbacks.LossScaleMonitor(max_consecutive_skips=40)
    return model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0,
                     callbacks=[monitor, *extra])


class PrecisionGuardTest(TestCase):
    def test_without_the_guard_training_stops(self):
        keras.utils.set_random_seed(0)
        with self.assertRaisesRegex(callbacks.LossScaleError,
                                    r"^40 training steps in a row were skipped"):
            _fit(_model("mixed_float16"))

    def test_the_overflowing_layer_and_only_it_becomes_float32(self):
        keras.utils.set_random_seed(0)
        x, y = _data()
        reference_model = _model("float32")
        _fit(reference_model)
        reference = reference_model.evaluate(x, y, verbose=0)
        keras.utils.set_random_seed(0)
        model = _model("mixed_float16")
        before = {layer.name: layer.dtype_policy.name for layer in model.layers}
        guard = precision_guard.PrecisionGuard(probe_data=(x, y), patience=5)
        history = _fit(model, [guard])
        after = {layer.name: layer.dtype_policy.name for layer in model.layers}
        self.assertEqual({name for name in after if after[name] != before[name]}, {"grow"})
        self.assertEqual(after["grow"], "float32")
        self.assertEqual(after["hidden"], "mixed_float16")
        self.assertEqual([s["layers"] for s in guard.switches], [["grow"]])
        self.assertRegex(guard.switches[0]["reason"],  # which of the two: the backend's rounding
                         r"^grow: (float16 run turns finite inputs into inf/NaN|"
                         r"max \|activation\| 6.55e\+04 > float16 max 65504)$")
        self.assertEqual(history.history["float32_layers"][-1], 1.0)
        self.assertEqual(len(history.history["loss"]), 20)  # training completed
        final = model.evaluate(x, y, verbose=0)
        self.assertTrue(np.isfinite(final))
        self.assertLess(abs(final - reference) / reference, 0.02, (final, reference))
        self.assertTrue(all(np.isfinite(keras.ops.convert_to_numpy(v)).all()
                            for v in model.weights))
        # The switch is kept by the saved model.
        path = os.path.join(self.tmp_dir(), "guarded.keras")
        model.save(path)
        reloaded = keras.saving.load_model(path)
        self.assertEqual(reloaded.get_layer("grow").dtype_policy.name, "float32")
        self.assertEqual(reloaded.get_layer("hidden").dtype_policy.name, "mixed_float16")

    def test_a_model_that_diverges_in_float32_still_stops_naming_the_layer(self):
        model = _model("mixed_float16")
        x, y = _data()
        x_bad = x.copy()
        x_bad[:] = np.inf  # inf in float32 too
        guard = precision_guard.PrecisionGuard(probe_data=x_bad[:8], patience=5)
        with self.assertRaisesRegex(callbacks.LossScaleError,
                                    r"^layer '.*' \(.*\) produces inf/NaN in float32 too"):
            model.fit(x_bad, y, batch_size=8, epochs=2, verbose=0,
                      callbacks=[callbacks.LossScaleMonitor(), guard])
        self.assertEqual(model.get_layer("grow").dtype_policy.name, "mixed_float16")

    def test_config_round_trip_and_bad_arguments(self):
        guard = precision_guard.PrecisionGuard(patience=7, low_scale=4.0, max_switches=2)
        clone = precision_guard.PrecisionGuard.from_config(guard.get_config())
        self.assertEqual(clone.get_config(), {"patience": 7, "low_scale": 4.0,
                                              "max_switches": 2})
        for kwargs, message in ((dict(patience=0), "patience=0"),
                                (dict(low_scale=0.0), "low_scale=0.0"),
                                (dict(max_switches=True), "max_switches=True")):
            with self.assertRaisesRegex(ValueError, message):
                precision_guard.PrecisionGuard(**kwargs)
