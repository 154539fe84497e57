"""Tests for tfmp.callbacks: LossScaleMonitor, Throughput.

Runs on every Keras backend without TensorFlow installed (the CI's JAX run);
the tests that read TensorBoard event files need TensorFlow installed.
"""

import glob
import importlib.util
import itertools
import os
import sys
import types
import unittest
from unittest import mock

import keras
import numpy as np
from absl.testing import parameterized
from keras import ops

import tfmp
from tests.base import BACKEND, TestCase, requires_tensorflow_installed, run_python

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# JAX's stateless `fit` path applies no `guard_state` and counts no non-finite losses.
def skip_if_steps_per_execution_unsupported(test, steps_per_execution):
    """Keras' PyTorch trainer refuses `steps_per_execution` > 1."""
    if steps_per_execution > 1 and BACKEND == "torch":
        test.skipTest("Keras' PyTorch backend runs one step per execution")


stateful_fit_only = unittest.skipIf(
    BACKEND == "jax", "JAX's stateless fit: the loss is scaled in a StatelessScope, so "
    "nonfinite_loss_steps is not counted")


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


def _batch_log_spy():
    """A callback that records the batch index and a copy of the logs of every batch end."""
    seen = []
    spy = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append((batch, dict(logs))))
    return spy, seen


def _read_batches(seen):
    """The batch indices whose logs hold the monitor's values: the steps it read."""
    return [batch for batch, logs in seen if "loss_scale" in logs]


def _read_scalars(log_dir):
    """`{tag: [(step, value), ...]}` from the TensorBoard event files in `log_dir`."""
    import tensorflow as tf

    scalars = {}
    for path in sorted(glob.glob(f"{log_dir}/events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(
                    (event.step, float(tf.make_ndarray(value.tensor))))
    return scalars


class LossScaleMonitorTest(TestCase):
    @parameterized.named_parameters(("every_step", 1), ("default", None), ("every_3", 3))
    def test_logs_scale_and_skips_in_history(self, check_every):
        keras.config.set_dtype_policy("mixed_float16")
        x, y = _data()
        model = _model(keras.layers.Dense(4))
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=16.0,
                                      dynamic_growth_steps=2)
        model.compile(optimizer=opt, loss="mse")
        x[0, 0] = np.nan  # the first batch of each epoch is skipped
        spy, seen = _batch_log_spy()
        history = model.fit(
            x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
            callbacks=[tfmp.callbacks.LossScaleMonitor(check_every=check_every), spy])
        # The epoch-end values do not depend on how often the monitor reads.
        self.assertEqual(history.history["skipped_steps"], [1, 2])
        self.assertEqual(history.history["loss_scale"][-1], float(opt.loss_scale))
        if check_every == 1:
            self.assertEqual([logs["skipped_steps"] for _, logs in seen[:4]], [1, 1, 1, 1])
            # 16 halved by the NaN batch, then doubled after 2 clean steps.
            self.assertEqual([logs["loss_scale"] for _, logs in seen[:3]], [8.0, 8.0, 16.0])

    @parameterized.named_parameters(
        # (check_every, max_consecutive_skips, batch indices read during one epoch of 8)
        ("every_step", 1, 100, list(range(8))),
        ("every_3", 3, 100, [2, 5]),
        ("default_stop_check_every_3", None, 3, [0, 3, 6]),  # after step 1, then every 3
        ("default_stop_check_every_100", None, 100, [0]),
        ("default_no_stop_check", None, None, []),
    )
    def test_reads_only_on_the_steps_check_every_names(self, check_every, max_skips, read):
        x, y = _data(32)
        model = _model()
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.01))
        model.compile(optimizer=opt, loss="mse")
        spy, seen = _batch_log_spy()
        monitor = tfmp.callbacks.LossScaleMonitor(max_consecutive_skips=max_skips,
                                                  check_every=check_every)
        with mock.patch.object(tfmp.callbacks, "_read_int", wraps=tfmp.callbacks._read_int) as r:
            history = model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                                callbacks=[monitor, spy])
        self.assertEqual(_read_batches(seen), read)
        self.assertEqual(history.history["loss_scale"], [2.0**15])  # and at the epoch end
        self.assertEqual(history.history["skipped_steps"], [0])
        # Device reads: per read, skipped_steps (+ consecutive skips), then the epoch's
        # non-finite loss counter at its start and end; none on the other steps.
        per_read = 2
        self.assertEqual(r.call_count, per_read * (len(read) + 1) + 2)

    @parameterized.named_parameters(
        ("check_every_4", 4, 4, [3, 7, 11, 15]), ("check_every_8", 8, 4, [7, 15]),
        ("check_every_3", 3, 4, [3, 7, 11, 15]),  # each execution end is >= 3 steps on
        ("check_every_6", 6, 4, [7, 15]),  # 4 steps unread at 3, 8 at 7: read; again at 15
    )
    def test_counts_steps_not_calls_with_steps_per_execution(self, check_every, spe, read):
        skip_if_steps_per_execution_unsupported(self, spe)
        x, y = _data(64)
        model = _model()
        model.compile(optimizer=tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.01)),
                      loss="mse", steps_per_execution=spe)
        spy, seen = _batch_log_spy()
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[
            tfmp.callbacks.LossScaleMonitor(check_every=check_every), spy])
        self.assertEqual([batch for batch, _ in seen], [3, 7, 11, 15])  # one call per execution
        self.assertEqual(_read_batches(seen), read)

    @parameterized.named_parameters(
        ("every_step", dict(check_every=1), [1, 2, 3, 4]),
        ("every_3", dict(check_every=3), [3, 4]),
        ("default", {}, [1, 4]),  # the first step, then the epoch end
        ("epoch_end_only", dict(max_consecutive_skips=None), [4]),
    )
    @requires_tensorflow_installed
    def test_writes_tensorboard_scalars_on_the_read_steps(self, kwargs, steps):
        log_dir = self.tmp_dir()
        x, y = _data(16)
        model = _model()
        model.compile(optimizer=tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.01)), loss="mse")
        model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                  callbacks=[tfmp.callbacks.LossScaleMonitor(log_dir=log_dir, **kwargs)])
        scalars = _read_scalars(log_dir)
        self.assertEqual(scalars["loss_scale"], [(step, 2.0**15) for step in steps])
        self.assertEqual(scalars["skipped_steps"], [(step, 0.0) for step in steps])

    def test_log_dir_without_tensorflow_fails_at_construction(self):
        with mock.patch.dict(sys.modules, {"tensorflow": None}):  # `import tensorflow` fails
            with self.assertRaisesRegex(
                    ImportError, r"^LossScaleMonitor\(log_dir=\.\.\.\) needs TensorFlow, which "
                    r"is not installed here \(.*\): pip install tensorflow [^\n]*$"):
                tfmp.callbacks.LossScaleMonitor(log_dir=self.tmp_dir())
            tfmp.callbacks.LossScaleMonitor()  # no log_dir: no TensorFlow needed

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

    @parameterized.named_parameters(
        # (check_every, steps_per_execution, steps run), max_consecutive_skips=5 at the floor.
        ("default", None, 1, 5),  # reads after steps 1 and 5: as with a read per step
        ("every_step", 1, 1, 5),
        ("every_5", 5, 1, 5),
        ("every_4", 4, 1, 8),  # reads at 4 (4 in a row) and 8: the bound, 5 + 4 - 1
        ("every_3", 3, 1, 6),
        ("every_3_two_per_execution", 3, 2, 8),  # reads at the ends of steps 4 and 8
        ("default_two_per_execution", None, 2, 6),  # reads at 2 and 6 (>= 5 - 2 = 3 on)
    )
    def test_hopeless_run_stops_within_the_bound(self, check_every, spe, steps):
        skip_if_steps_per_execution_unsupported(self, spe)
        max_skips = 5
        x, y = _data(32)  # 16 steps per epoch: the stop comes mid-epoch
        model = _model(NanGradient(name="broken"))
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=1.0)
        model.compile(optimizer=opt, loss="mse", steps_per_execution=spe)
        monitor = tfmp.callbacks.LossScaleMonitor(max_consecutive_skips=max_skips,
                                                  check_every=check_every)
        with self.assertRaisesRegex(tfmp.callbacks.LossScaleError,
                                    rf"^{steps} training steps in a row"):
            model.fit(x, y, batch_size=2, epochs=2, verbose=0, callbacks=[monitor])
        run = int(ops.convert_to_numpy(opt.skipped_steps)) + int(
            ops.convert_to_numpy(opt.iterations))
        self.assertEqual(run, steps)
        self.assertLessEqual(run, max_skips + (check_every or 1) - 1 + spe - 1)

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
                            callbacks=[tfmp.callbacks.LossScaleMonitor(check_every=1)])
        self.assertNotIn("loss_scale", history.history)

    @parameterized.named_parameters(
        ("max_consecutive_skips", dict(max_consecutive_skips=0), "`max_consecutive_skips` must "
         "be an integer >= 1 or None. Received: max_consecutive_skips=0"),
        ("check_every_zero", dict(check_every=0),
         r"^`check_every` must be an integer >= 1 or None. Received: check_every=0$"),
        ("check_every_float", dict(check_every=2.5), r"Received: check_every=2.5$"),
        ("check_every_bool", dict(check_every=True), r"Received: check_every=True$"),
        ("check_every_string", dict(check_every="10"), r"Received: check_every='10'$"),
    )
    def test_bad_argument(self, kwargs, message):
        with self.assertRaisesRegex(ValueError, message):
            tfmp.callbacks.LossScaleMonitor(**kwargs)

    def test_config_round_trip(self):
        cb = tfmp.callbacks.LossScaleMonitor(max_consecutive_skips=7, guard_state=False,
                                             check_every=np.int64(25))
        config = cb.get_config()
        self.assertEqual(config, {"log_dir": None, "max_consecutive_skips": 7,
                                  "guard_state": False, "check_every": 25})
        self.assertIs(type(config["check_every"]), int)
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(cb))
        self.assertIsInstance(restored, tfmp.callbacks.LossScaleMonitor)
        self.assertEqual(restored.get_config(), config)

    def test_config_without_check_every_still_loads(self):
        old = {"log_dir": None, "max_consecutive_skips": 7, "guard_state": True}  # before it
        restored = tfmp.callbacks.LossScaleMonitor.from_config(old)
        self.assertEqual(restored.get_config(), {**old, "check_every": None})

    @parameterized.named_parameters(("default", None), ("every_step", 1), ("every_3", 3))
    @stateful_fit_only
    def test_tells_nonfinite_data_from_overflow(self, check_every):
        keras.config.set_dtype_policy("mixed_float16")
        x, y = _data()
        x[4, 0] = np.nan  # the second batch: the loss itself is NaN
        model = _model(keras.layers.Dense(4))
        # 2**24 overflows the float16 gradients of the clean first batch.
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=2.0**24)
        model.compile(optimizer=opt, loss="mse")
        with self.assertLogs("tfmp", level="WARNING") as logs:
            history = model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0,
                                callbacks=[tfmp.callbacks.LossScaleMonitor(
                                    check_every=check_every)])
        self.assertGreaterEqual(history.history["skipped_steps"][0], 2)
        self.assertEqual(history.history["nonfinite_loss_steps"], [1])
        self.assertEqual(len(logs.output), 1)
        self.assertRegex(logs.output[0], "epoch 1: 1 skipped step.* non-finite loss: inf/NaN "
                         "in the data or in the forward pass, not a loss-scale overflow")

    @parameterized.named_parameters(("default", None), ("every_4", 4))
    def test_guards_state_restored_by_backup(self, check_every):
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
        model.fit(x, y, batch_size=8, verbose=0, callbacks=[
            tfmp.callbacks.LossScaleMonitor(check_every=check_every), restore])
        for value, expected in zip(model.non_trainable_variables, restored, strict=True):
            np.testing.assert_array_equal(ops.convert_to_numpy(value), expected)


def _fake_clock():
    """A `time` module whose clock advances one second per reading."""
    return types.SimpleNamespace(perf_counter=itertools.count().__next__)


class ThroughputTest(TestCase):
    def test_examples_per_second_in_epoch_logs(self):
        x, y = _data()
        model = _model()
        model.compile(optimizer="sgd", loss="mse")
        history = model.fit(x, y, batch_size=4, epochs=2, verbose=0,
                            callbacks=[tfmp.callbacks.Throughput(batch_size=4)])
        self.assertEqual(len(history.history["examples_per_second"]), 2)
        self.assertTrue(all(v > 0 for v in history.history["examples_per_second"]))

    @parameterized.named_parameters(
        # (examples, steps_per_execution, calls per epoch): batches of 4.
        ("one_step_per_execution", 64, 1, 16),
        ("four_steps_per_execution", 64, 4, 4),
        ("last_execution_cut_short", 40, 4, 3),  # 10 steps: 4 + 4 + 2
    )
    def test_counts_the_steps_run_with_steps_per_execution(self, examples, spe, calls):
        skip_if_steps_per_execution_unsupported(self, spe)
        x, y = _data(examples)
        model = _model()
        model.compile(optimizer="sgd", loss="mse", steps_per_execution=spe)
        # One clock second per reading: at each epoch start, then at each batch-end call.
        with mock.patch.object(tfmp.callbacks, "time", _fake_clock()):
            history = model.fit(x, y, batch_size=4, epochs=2, verbose=0,
                                callbacks=[tfmp.callbacks.Throughput(batch_size=4)])
        self.assertEqual(history.history["examples_per_second"], [examples / calls] * 2)

    def test_bad_batch_size(self):
        with self.assertRaisesRegex(ValueError, "`batch_size` must be an integer >= 1. "
                                    "Received: batch_size=0"):
            tfmp.callbacks.Throughput(0)

    def test_config_round_trip(self):
        cb = tfmp.callbacks.Throughput(batch_size=32)
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(cb))
        self.assertEqual(restored.get_config(), {"batch_size": 32})


_NO_TENSORFLOW_SCRIPT = r'''
import sys
import keras
import numpy as np
import tfmp
assert keras.backend.backend() == "jax"
x = np.ones((16, 3), "float32")
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
model.compile(optimizer=tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.01)), loss="mse")
history = model.fit(x, x[:, :1], batch_size=4, verbose=0, callbacks=[
    tfmp.callbacks.LossScaleMonitor(check_every=2), tfmp.callbacks.Throughput(4)])
assert history.history["loss_scale"] == [2.0**15], history.history
assert history.history["examples_per_second"][0] > 0, history.history
try:
    tfmp.callbacks.LossScaleMonitor(log_dir="logs")
except ImportError as e:
    print("ImportError:", e)
loaded = sorted(m for m, v in sys.modules.items() if m.startswith("tensorflow") and v)
print("tensorflow modules:", loaded)
'''


class WithoutTensorFlowTest(TestCase):
    @unittest.skipUnless(importlib.util.find_spec("jax"), "JAX not installed")
    def test_callbacks_run_on_jax_without_tensorflow(self):
        proc = run_python(["-c", _NO_TENSORFLOW_SCRIPT], backend="jax", without_tensorflow=True,
                          timeout=240)
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        self.assertIn("ImportError: LossScaleMonitor(log_dir=...) needs TensorFlow, which is "
                      "not installed here", proc.stdout)
        self.assertIn("tensorflow modules: []", proc.stdout)
