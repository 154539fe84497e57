"""Tests for tfmp.training and the checkpoint/throughput callbacks it uses."""

import io
import itertools
import json
import os
import types
from contextlib import redirect_stderr
from unittest import mock

import keras
import numpy as np
from absl.testing import parameterized

import tfmp
from tests.base import TestCase
from tfmp import cli, training


def _config(**settings) -> training.RunConfig:
    """A small run: batch 8, one epoch (`settings` by flag name)."""
    return training.RunConfig.from_flat({"batch_size": 8, "epochs": 1, **settings})


def _model():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                             tfmp.layers.OutputHead(3)])


def _data(n=64, batch=8, nan=False):
    x, y = tfmp.data.synthetic_text(n, 4, 50, 3, seed=0)  # learnable, small, int ids
    x = x.astype("float32") / 50
    if nan:
        x[:] = np.nan  # every step is skipped
    import tensorflow as tf
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def _fake_clock():
    """A `time` module for `tfmp.callbacks` whose clock advances one second per reading."""
    return types.SimpleNamespace(perf_counter=itertools.count().__next__)


class OptimizerTest(TestCase):
    @parameterized.named_parameters(
        ("mixed_dynamic", "mixed_float16", "dynamic", True, True, 2.0**15),
        ("mixed_fixed", "mixed_float16", "512", True, False, 512.0),
        ("bfloat16", "mixed_bfloat16", "dynamic", False, True, 2.0**15),
        ("float32", "float32", "dynamic", False, True, 2.0**15),
    )
    def test_make_optimizer(self, policy, loss_scale, enabled, dynamic, scale):
        opt = training.make_optimizer(_config(loss_scale=loss_scale), policy)
        self.assertEqual((opt.enabled, opt.dynamic, opt.initial_scale), (enabled, dynamic, scale))
        self.assertTrue(opt.skip_nonfinite)
        self.assertIsInstance(opt.inner_optimizer, keras.optimizers.Adam)

    def test_linear_scaling_uses_the_accumulated_batch(self):
        opt = training.make_optimizer(_config(optimizer="sgd", learning_rate=0.1,
                                              lr_scaling="linear", grad_accum_steps=4),
                                      "float32")
        # 0.1 * (8 * 4) / 256
        self.assertAlmostEqual(float(keras.ops.convert_to_numpy(
            opt.inner_optimizer.learning_rate)), 0.0125, places=7)

    @parameterized.named_parameters(
        ("steps_per_epoch", dict(steps_per_epoch=5, epochs=3), 15),
        ("cardinality", dict(epochs=2), 16),  # 64 examples in batches of 8, twice
        ("constant", dict(lr_schedule="constant"), None))
    def test_total_steps(self, settings, expected):
        config = _config(**{"lr_schedule": "cosine", **settings})
        self.assertEqual(training.total_steps(config, _data()), expected)

    def test_total_steps_of_an_endless_dataset_is_a_usage_error(self):
        with self.assertRaisesRegex(
                training.UsageError, r"^`lr_schedule='cosine'` \(or a warm-up\) needs the run's "
                r"length: pass --steps_per_epoch"):
            training.total_steps(_config(lr_schedule="cosine"), _data().repeat())

    def test_warmup_longer_than_the_run_is_a_usage_error(self):
        with self.assertRaisesRegex(training.UsageError, r"^`warmup_steps` \(20\) must be "
                                    r"below the run's optimizer steps. Received: total_steps=8$"):
            training.total_steps(_config(warmup_steps=20), _data())

    def test_run_main_reports_a_bad_flag_value_in_one_line(self):
        values = {name: types.SimpleNamespace(value=value) for name, value in
                  _config().flat().items() if name != "recipe"}  # flag holders' stand-ins
        values["batch_size"] = types.SimpleNamespace(value=-4)
        stderr = io.StringIO()
        with redirect_stderr(stderr):
            status = cli.call(lambda argv: training.run_main(
                lambda config: self.fail("ran"), "image_classification", values, {}), ["prog"])
        self.assertEqual(status, 2)
        self.assertRegex(stderr.getvalue(),
                         r"^error: `batch_size` must be an integer >= 1. Received: "
                         r"batch_size=-4\n$")


class OutputPathsTest(TestCase):
    """Item: output paths are refused before any work, not after the training."""

    def setUp(self):
        super().setUp()
        self.dir, self.file = self.tmp_dir_with_a_file()

    def _check(self, model_dir=None, export_dir=None):
        training.check_output_paths(model_dir, export_dir)

    def test_good_paths(self):
        self._check(model_dir=os.path.join(self.dir, "run"),
                    export_dir=os.path.join(self.dir, "export"))

    @parameterized.named_parameters(
        ("model_dir_is_a_file", dict(model_dir="afile"),
         r"^`model_dir` exists and is not a directory. Received: model_dir='.*afile'$"),
        ("model_dir_under_a_file", dict(model_dir="afile/run"),
         r"^`model_dir` cannot be created: '.*afile' is not a directory"),
        ("export_dir_under_a_file", dict(export_dir="afile/export"),
         r"^`export_dir` cannot be created: '.*afile' is not a directory"),
        ("export_dir_is_model_dir", dict(model_dir="run", export_dir="run"),
         r"^`export_dir` must be outside `model_dir` and not contain it"),
        ("export_dir_inside_model_dir", dict(model_dir="run", export_dir="run/export"),
         r"^`export_dir` must be outside `model_dir` and not contain it .*"
         r"Received: export_dir='.*run/export', model_dir='.*run'$"),
        ("export_dir_around_model_dir", dict(model_dir="out/run", export_dir="out"),
         r"^`export_dir` must be outside `model_dir`"),
    )
    def test_bad_paths(self, paths, message):
        paths = {name: os.path.join(self.dir, path) for name, path in paths.items()}
        with self.assertRaisesRegex(training.UsageError, message):
            self._check(**paths)

    @parameterized.named_parameters(
        ("model_dir", "model_dir", "run"), ("new_model_dir", "model_dir", "new/run"),
        ("export_dir", "export_dir", "export"))
    def test_read_only(self, argument, path):
        # Root ignores permission bits: os.access stands for a read-only file system.
        read_only = os.path.join(self.dir, "ro")
        os.makedirs(os.path.join(read_only, "run"))
        real_access = os.access

        def access(p, mode):
            inside = os.path.commonpath([os.path.realpath(p), read_only]) == read_only
            return not (inside and mode & os.W_OK) and real_access(p, mode)

        with mock.patch("os.access", side_effect=access):
            with self.assertRaisesRegex(
                    training.UsageError, rf"^`{argument}` cannot be written: '.*ro.*' is "
                    rf"read-only or not writable by this user. Received: {argument}="):
                self._check(**{argument: os.path.join(read_only, path)})


def _train(build=_model, train=None, evaluation=None, **settings) -> dict:
    config = _config(**settings)
    training.prepare(config)
    return training.train_and_evaluate(config, build, _data() if train is None else train,
                                       evaluation, verbose=0)


def _scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """The TensorBoard scalars under `log_dir`: {tag: [(step, value), ...]}, in step order."""
    import tensorflow as tf

    points = {}
    for root, _, files in os.walk(log_dir):
        for name in sorted(f for f in files if f.startswith("events")):
            for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                for value in event.summary.value:
                    if value.metadata.plugin_data.plugin_name != "scalars":
                        continue  # the model's config, as text
                    points.setdefault(value.tag, []).append(
                        (event.step, float(tf.make_ndarray(value.tensor))))
    return {tag: sorted(values) for tag, values in points.items()}


class TrainAndEvaluateTest(TestCase):
    def test_trains_logs_backs_up_and_exports(self):
        model_dir, export_dir = self.tmp_dir(), os.path.join(self.tmp_dir(), "export")
        results = _train(evaluation=_data(16), policy="mixed_float16", epochs=2,
                         steps_per_epoch=6, learning_rate=1e-2, model_dir=model_dir,
                         export_dir=export_dir)
        self.assertEqual(results["policy"], "mixed_float16")
        self.assertEqual((results["epochs_run"], results["optimizer_steps"]), (2, 12))
        self.assertEqual(results["loss_scale"], 2.0**15)
        self.assertAlmostEqual(results["learning_rate"], 1e-2)
        self.assertEqual(len(results["examples_per_second"]), 2)
        self.assertTrue(all(v > 0 for v in results["examples_per_second"]))
        self.assertTrue(np.isfinite(results["eval_loss"]))
        self.assertTrue(os.path.isdir(os.path.join(model_dir, "backup", "latest")))
        self.assertEqual(results["model_file"], os.path.join(model_dir, "model.keras"))
        loaded = keras.saving.load_model(results["model_file"])  # safe_mode, no custom_objects
        self.assertIsInstance(loaded.optimizer, tfmp.LossScaleOptimizer)
        self.assertEqual(tfmp.export.serving_signature(export_dir)["outputs"]["output_0"][0],
                         "float32")

    def test_resume_continues_the_schedule_and_the_tensorboard_scalars(self):
        # Warm-up over 4 steps, then cosine decay to 0: 3 epochs of 2 steps, then
        # resumed with --epochs=5 (allowed): the schedule is stretched to 10 steps.
        model_dir = self.tmp_dir()
        settings = dict(policy="mixed_float16", steps_per_epoch=2, learning_rate=0.1,
                        optimizer="sgd", lr_schedule="cosine", warmup_steps=4,
                        model_dir=model_dir)
        with self.assertRaisesRegex(training.UsageError, r"warmup_steps"):
            _train(epochs=2, **settings)  # the 4 warm-up steps are the whole run of 2 epochs
        first = _train(epochs=3, **settings)
        keras.backend.clear_session()
        second = _train(epochs=5, **settings)
        self.assertEqual((first["optimizer_steps"], second["epochs_run"],
                          second["optimizer_steps"]), (6, 2, 10))
        self.assertAlmostEqual(second["learning_rate"], 0.0, places=7)
        scalars = _scalars(os.path.join(model_dir, "logs", "train"))
        steps = [0, 1, 2, 3, 4]
        self.assertEqual([step for step, _ in scalars["epoch_learning_rate"]], steps)
        # After 2 and 4 steps: warming up; 6: the end of a 6-step decay; 8 and 10: of a
        # 10-step one (cosine over the 6 steps after the warm-up).
        rates = [value for _, value in scalars["epoch_learning_rate"]]
        np.testing.assert_allclose(
            rates, [0.05, 0.1, 0.0, 0.1 * 0.5 * (1 + np.cos(np.pi * 4 / 6)), 0.0], atol=1e-6)
        for tag in ("epoch_loss_scale", "epoch_skipped_steps", "epoch_examples_per_second",
                    "epoch_loss"):
            self.assertEqual([step for step, _ in scalars[tag]], steps, tag)
        monitor = _scalars(os.path.join(model_dir, "logs", "loss_scale"))
        self.assertEqual(monitor["loss_scale"][-1], (10, 2.0**15))
        with open(os.path.join(model_dir, "config.json")) as f:
            record = json.load(f)
        self.assertEqual(record["resumes"], [{"epochs": [3, 5]}])

    def test_resumes_from_backup_with_optimizer_state(self):
        model_dir = self.tmp_dir()
        kwargs = dict(policy="mixed_float16", steps_per_epoch=4, model_dir=model_dir)
        first = _train(epochs=2, **kwargs)
        keras.backend.clear_session()
        second = _train(epochs=3, **kwargs)
        self.assertEqual(first["optimizer_steps"], 8)
        # Only the third epoch ran, on top of the restored optimizer state.
        self.assertEqual((second["epochs_run"], second["optimizer_steps"]), (1, 12))

    def test_steps_per_execution_and_jit_compile_reach_compile(self):
        compile_calls = []
        real_compile = keras.Model.compile

        def spy(model, *args, **kwargs):
            compile_calls.append(kwargs)
            return real_compile(model, *args, **kwargs)

        with mock.patch.object(keras.Model, "compile", spy), \
                mock.patch.object(tfmp.callbacks, "time", _fake_clock()):
            results = _train(policy="float32", epochs=2, steps_per_epoch=4,
                             steps_per_execution=2, label_smoothing=0.2)
        self.assertEqual((compile_calls[0]["jit_compile"],
                          compile_calls[0]["steps_per_execution"]), ("auto", 2))
        self.assertEqual(compile_calls[0]["loss"].label_smoothing, 0.2)
        # Keras' "auto" on a CPU-only machine: no XLA.
        self.assertEqual((results["jit_compile"], results["steps_per_execution"]), (False, 2))
        self.assertEqual(results["optimizer_steps"] + results["skipped_steps"], 8)
        # One clock second per batch-end call, 2 calls per epoch of 4 steps of 8 examples.
        self.assertEqual(results["examples_per_second"], [4 * 8 / 2] * 2)

    def test_hopeless_run_stops_with_steps_per_execution(self):
        # The monitor's default (max_consecutive_skips=100, check_every=None) reads
        # after the first execution, then 100 - 2 steps later: it stops at step 100.
        built = []

        def build():
            built.append(_model())
            return built[-1]

        with self.assertRaisesRegex(tfmp.callbacks.LossScaleError,
                                    r"^100 training steps in a row were skipped"):
            _train(build, _data(nan=True), policy="float32", epochs=1, steps_per_epoch=200,
                   steps_per_execution=2)
        optimizer = built[0].optimizer
        self.assertEqual(int(keras.ops.convert_to_numpy(optimizer.skipped_steps)), 100)
        self.assertEqual(int(keras.ops.convert_to_numpy(optimizer.iterations)), 0)

    def test_describe_run_is_one_line(self):
        line = training.describe_run(_config(), "mixed_float16",
                                     tfmp.distribute.create_strategy("none"))
        self.assertEqual(line, "policy mixed_float16 (float16 compute, float32 variables, "
                         "dynamic loss scale); CPU only (no GPU found); distribution none "
                         "(1 replica(s)); optimizer adam")
