"""Tests for tfmp.callbacks: LossScaleMonitor, Throughput."""

import glob

import keras
import numpy as np
import tensorflow as tf
from keras import ops

import tfmp
from tests.base import TestCase


@keras.saving.register_keras_serializable(package="tfmp_test")
class NanGradient(keras.layers.Layer):
    """Identity forward (adds sqrt(0)); the gradient of its variable `trap` is inf."""

    def build(self, input_shape):
        self.trap = self.add_weight(shape=(), initializer="zeros",
                                    name="trap")

    def call(self, x):
        return x + ops.sqrt(self.trap)


def _data(n=16):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


def _model(*layers):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((3,)), *layers, keras.layers.Dense(1)])


class LossScaleMonitorTest(TestCase):
    def test_logs_scale_and_skips_in_history(self):
        keras.config.set_dtype_policy("mixed_float16")
        x, y = _data()
        model = _model(keras.layers.Dense(4))
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=16.0,
                                      dynamic_growth_steps=2)
        model.compile(optimizer=opt, loss="mse")
        x[0, 0] = np.nan  # the first batch of each epoch is skipped
        batch_logs = []
        spy = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: batch_logs.append(
            dict(logs)))
        history = model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
                            callbacks=[tfmp.callbacks.LossScaleMonitor(), spy])
        self.assertEqual(history.history["skipped_steps"], [1, 2])
        self.assertEqual(history.history["loss_scale"][-1], float(opt.loss_scale))
        self.assertEqual([b["skipped_steps"] for b in batch_logs[:4]], [1, 1, 1, 1])
        # 16 halved by the NaN batch, then doubled after 2 clean steps.
        self.assertEqual([b["loss_scale"] for b in batch_logs[:3]], [8.0, 8.0, 16.0])

    def test_writes_tensorboard_scalars(self):
        log_dir = self.tmp_dir()
        x, y = _data(8)
        model = _model()
        model.compile(optimizer=tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.01)), loss="mse")
        model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                  callbacks=[tfmp.callbacks.LossScaleMonitor(log_dir=log_dir)])
        scalars = {}
        for path in glob.glob(f"{log_dir}/events.out.tfevents.*"):
            for record in tf.data.TFRecordDataset(path):
                event = tf.compat.v1.Event.FromString(record.numpy())
                for value in event.summary.value:
                    scalars.setdefault(value.tag, []).append(
                        (event.step, float(tf.make_ndarray(value.tensor))))
        self.assertEqual(scalars["loss_scale"], [(1, 2.0**15), (2, 2.0**15)])  # steps 1 and 2
        self.assertEqual(scalars["skipped_steps"], [(1, 0.0), (2, 0.0)])

    def test_stops_hopeless_run_and_names_the_variable(self):
        x, y = _data()
        model = _model(keras.layers.Dense(4, name="fine"), NanGradient(name="broken"))
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=4.0)
        model.compile(optimizer=opt, loss="mse")
        before = model.get_weights()
        message = (r"3 training steps in a row.*minimum \(1\)\. Loss scaling cannot fix this"
                   r".*: sequential/broken/trap\.$")
        with self.assertRaisesRegex(tfmp.callbacks.LossScaleError, message):
            model.fit(x, y, batch_size=2, epochs=3, verbose=0,
                      callbacks=[tfmp.callbacks.LossScaleMonitor(max_consecutive_skips=3)])
        # Scale 4 -> 2 -> 1 -> 1: the third skip in a row, at the floor, stops training.
        self.assertEqual(int(ops.convert_to_numpy(opt.skipped_steps)), 3)
        self.assertEqual(opt.nonfinite_variables(), ["sequential/broken/trap"])
        for a, b in zip(before, model.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)

    def test_disabled_optimizer_logs_scale_one(self):
        x, y = _data(8)
        model = _model()
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.01), enabled=False)
        model.compile(optimizer=opt, loss="mse")
        history = model.fit(x, y, epochs=1, verbose=0,
                            callbacks=[tfmp.callbacks.LossScaleMonitor()])
        self.assertEqual(history.history["loss_scale"], [1.0])

    def test_stops_at_a_min_scale_not_exact_in_float32(self):
        x, y = _data()
        model = _model(NanGradient(name="broken"))
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=0.4,
                                      min_scale=0.1)
        model.compile(optimizer=opt, loss="mse")
        with self.assertRaisesRegex(tfmp.callbacks.LossScaleError, r"minimum \(0.1\)"):
            model.fit(x, y, batch_size=2, epochs=3, verbose=0,
                      callbacks=[tfmp.callbacks.LossScaleMonitor(max_consecutive_skips=4)])
        self.assertEqual(int(ops.convert_to_numpy(opt.skipped_steps)), 4)

    def test_no_optimizer_scaling_is_a_no_op(self):
        x, y = _data(8)
        model = _model()
        model.compile(optimizer="sgd", loss="mse")
        history = model.fit(x, y, epochs=1, verbose=0,
                            callbacks=[tfmp.callbacks.LossScaleMonitor()])
        self.assertNotIn("loss_scale", history.history)

    def test_bad_argument(self):
        with self.assertRaisesRegex(ValueError, "`max_consecutive_skips` must be an integer >= 1 "
                                    "or None. Received: max_consecutive_skips=0"):
            tfmp.callbacks.LossScaleMonitor(max_consecutive_skips=0)

    def test_config_round_trip(self):
        cb = tfmp.callbacks.LossScaleMonitor(log_dir="logs", max_consecutive_skips=7,
                                             guard_state=False)
        restored = tfmp.callbacks.LossScaleMonitor.from_config(cb.get_config())
        self.assertEqual((restored.log_dir, restored.max_consecutive_skips,
                          restored.guard_state), ("logs", 7, False))
        self.assertEqual(restored.get_config(), cb.get_config())

    def test_tells_nonfinite_data_from_overflow(self):
        keras.config.set_dtype_policy("mixed_float16")
        x, y = _data()
        x[4, 0] = np.nan  # the second batch: the loss itself is NaN
        model = _model(keras.layers.Dense(4))
        # 2**24 overflows the float16 gradients of the clean first batch.
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=2.0**24)
        model.compile(optimizer=opt, loss="mse")
        with self.assertLogs("tfmp", level="WARNING") as logs:
            history = model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0,
                                callbacks=[tfmp.callbacks.LossScaleMonitor()])
        self.assertGreaterEqual(history.history["skipped_steps"][0], 2)
        self.assertEqual(history.history["nonfinite_loss_steps"], [1])
        self.assertRegex(logs.output[0], "epoch 1: 1 skipped step.* non-finite loss: inf/NaN "
                         "in the data or in the forward pass, not a loss-scale overflow")

    def test_guards_state_restored_by_backup(self):
        # The monitor copies the statistics before the first step, after any
        # on_train_begin restore: a NaN first batch leaves the restored values.
        x, y = _data(8)
        model = _model(keras.layers.Dense(4), keras.layers.BatchNormalization())
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.01))
        model.compile(optimizer=opt, loss="mse")
        restored = [np.full(v.shape, 0.5, "float32") for v in model.non_trainable_variables]
        restore = keras.callbacks.LambdaCallback(on_train_begin=lambda logs: [
            v.assign(r) for v, r in zip(model.non_trainable_variables, restored, strict=True)])
        x[0, 0] = np.nan
        model.fit(x, y, batch_size=8, verbose=0,
                  callbacks=[tfmp.callbacks.LossScaleMonitor(), restore])
        for value, expected in zip(model.non_trainable_variables, restored, strict=True):
            np.testing.assert_array_equal(value.numpy(), expected)


class ThroughputTest(TestCase):
    def test_examples_per_second_in_epoch_logs(self):
        x, y = _data()
        model = _model()
        model.compile(optimizer="sgd", loss="mse")
        history = model.fit(x, y, batch_size=4, epochs=2, verbose=0,
                            callbacks=[tfmp.callbacks.Throughput(batch_size=4)])
        self.assertEqual(len(history.history["examples_per_second"]), 2)
        self.assertTrue(all(v > 0 for v in history.history["examples_per_second"]))

    def test_bad_batch_size(self):
        with self.assertRaisesRegex(ValueError, "`batch_size` must be an integer >= 1. "
                                    "Received: batch_size=0"):
            tfmp.callbacks.Throughput(0)
