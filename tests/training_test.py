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

_ARGS = dict(policy="mixed_float16", loss_scale="dynamic", dataset="synthetic",
             datasets=("synthetic", "cifar10"), batch_size=8, epochs=1, steps_per_epoch=None,
             learning_rate=1e-3, distribution="none")


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


class ArgsTest(TestCase):
    @parameterized.named_parameters(
        ("dynamic", "dynamic", None), ("fixed", "128", 128.0), ("float", 0.5, 0.5))
    def test_parse_loss_scale(self, value, expected):
        self.assertEqual(training.parse_loss_scale(value), expected)

    @parameterized.named_parameters(
        ("policy", dict(policy="fp16"), "Unknown `policy`: 'fp16'. Expected one of: "
         "mixed_float16, mixed_bfloat16, float32, auto."),
        ("loss_scale_negative", dict(loss_scale="-2"), "`loss_scale` must be 'dynamic' or a "
         "positive number. Received: loss_scale='-2'"),
        ("loss_scale_word", dict(loss_scale="static"), "loss_scale='static'"),
        ("loss_scale_inf", dict(loss_scale="inf"), "loss_scale='inf'"),
        ("dataset", dict(dataset="mnist"), "Unknown `dataset`: 'mnist'. Expected one of: "
         "synthetic, cifar10."),
        ("batch_size", dict(batch_size=0), "`batch_size` must be a positive integer. "
         "Received: batch_size=0"),
        ("epochs", dict(epochs=-1), "epochs=-1"),
        ("steps", dict(steps_per_epoch=0), "steps_per_epoch=0"),
        ("learning_rate", dict(learning_rate=0.0), "learning_rate=0.0"),
        ("distribution", dict(distribution="tpu"), "Unknown `distribution`: 'tpu'"),
        ("steps_per_execution", dict(steps_per_execution=0), r"^`steps_per_execution` must be "
         r"a positive integer. Received: steps_per_execution=0$"),
        ("steps_per_execution_bool", dict(steps_per_execution=True), "steps_per_execution=True"),
        ("steps_per_execution_not_dividing", dict(steps_per_epoch=6, steps_per_execution=4),
         r"^`steps_per_epoch` must be a multiple of `steps_per_execution` \(Keras runs whole "
         r"executions: each epoch would run 8 steps\). Received: steps_per_epoch=6, "
         r"steps_per_execution=4$"),
        ("jit_compile", dict(jit_compile="maybe"), r"^`jit_compile` must be one of 'auto', "
         r"'true', 'false' \(or a bool\). Received: jit_compile='maybe'$"),
    )
    def test_bad_args(self, override, message):
        with self.assertRaisesRegex(training.UsageError, message):
            training.check_args(**{**_ARGS, **override})

    def test_good_args(self):
        training.check_args(**_ARGS)  # raises nothing
        training.check_args(**{**_ARGS, "steps_per_epoch": 8, "steps_per_execution": 4,
                               "jit_compile": "true"})
        training.check_args(**{**_ARGS, "steps_per_execution": 3})  # a full pass: any

    @parameterized.named_parameters(
        ("auto", "auto", "auto"), ("true", "true", True), ("false_upper", "FALSE", False),
        ("bool", True, True))
    def test_parse_jit_compile(self, value, expected):
        self.assertEqual(training.parse_jit_compile(value), expected)

    @parameterized.named_parameters(
        ("mixed_dynamic", "mixed_float16", "dynamic", True, True, 2.0**15),
        ("mixed_fixed", "mixed_float16", "512", True, False, 512.0),
        ("bfloat16", "mixed_bfloat16", "dynamic", False, True, 2.0**15),
        ("float32", "float32", "dynamic", False, True, 2.0**15),
    )
    def test_make_optimizer(self, policy, loss_scale, enabled, dynamic, scale):
        opt = training.make_optimizer(1e-3, policy, loss_scale)
        self.assertEqual((opt.enabled, opt.dynamic, opt.initial_scale), (enabled, dynamic, scale))
        self.assertIsInstance(opt.inner_optimizer, keras.optimizers.Adam)

    def test_run_main_lets_tfmp_cli_report_usage_errors_in_one_line(self):
        def run(**kwargs):
            training.check_args(**{**_ARGS, **kwargs})

        stderr = io.StringIO()
        with redirect_stderr(stderr):
            status = cli.call(lambda argv: training.run_main(run, {"batch_size": -4}), ["prog"])
        self.assertEqual(status, 2)
        self.assertRegex(stderr.getvalue(),
                         r"^error: `batch_size` must be a positive integer. Received: "
                         r"batch_size=-4\n$")


class OutputPathsTest(TestCase):
    """Item: output paths are refused before any work, not after the training."""

    def setUp(self):
        super().setUp()
        self.dir, self.file = self.tmp_dir_with_a_file()

    def _check(self, **paths):
        training.check_args(**{**_ARGS, **paths})

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


class RunSettingsTest(TestCase):
    """Item: resuming with another model is refused in one line, naming the setting."""

    _SETTINGS = {"recipe": "image_classification", "model": "resnet_mini", "image_size": 32}

    def test_records_atomically_then_accepts_the_same(self):
        model_dir = os.path.join(self.tmp_dir(), "run")
        training.check_run_settings(model_dir, self._SETTINGS)
        self.assertEqual(os.listdir(model_dir), ["run.json"])  # no temporary left
        with open(os.path.join(model_dir, "run.json")) as f:
            self.assertEqual(json.load(f), {"model_settings": self._SETTINGS})
        training.check_run_settings(model_dir, dict(self._SETTINGS))

    def test_other_settings_are_refused(self):
        model_dir = self.tmp_dir()
        training.check_run_settings(model_dir, self._SETTINGS)
        with self.assertRaisesRegex(
                training.UsageError,
                r"^`model_dir` holds a run with image_size=32, model='resnet_mini'; this run "
                r"has image_size=64, model='resnet50'. Pass the same settings to resume that "
                r"run, or a new --model_dir for a new run. Received: model_dir='.*'$"):
            training.check_run_settings(
                model_dir, {**self._SETTINGS, "model": "resnet50", "image_size": 64})

    def test_only_the_chief_writes(self):
        model_dir = self.tmp_dir()
        training.check_run_settings(model_dir, self._SETTINGS, write=False)
        self.assertEqual(os.listdir(model_dir), [])

    def test_unreadable_run_file(self):
        model_dir = self.tmp_dir()
        with open(os.path.join(model_dir, "run.json"), "w") as f:
            f.write("{not json")
        with self.assertRaisesRegex(training.UsageError,
                                    r"^`model_dir` has an unreadable run.json \(JSONDecodeError"):
            training.check_run_settings(model_dir, self._SETTINGS)


class TrainAndEvaluateTest(TestCase):
    def test_trains_logs_backs_up_and_exports(self):
        model_dir, export_dir = self.tmp_dir(), os.path.join(self.tmp_dir(), "export")
        results = training.train_and_evaluate(
            _model, _data(), _data(16), policy="mixed_float16", epochs=2, steps_per_epoch=6,
            batch_size=8, learning_rate=1e-2, model_dir=model_dir, export_dir=export_dir,
            verbose=0)
        self.assertEqual(results["policy"], "mixed_float16")
        self.assertEqual((results["epochs_run"], results["optimizer_steps"]), (2, 12))
        self.assertEqual(results["loss_scale"], 2.0**15)
        self.assertEqual(len(results["examples_per_second"]), 2)
        self.assertTrue(all(v > 0 for v in results["examples_per_second"]))
        self.assertTrue(np.isfinite(results["eval_loss"]))
        self.assertTrue(os.path.isdir(os.path.join(model_dir, "backup", "latest")))
        self.assertEqual(results["model_file"], os.path.join(model_dir, "model.keras"))
        loaded = keras.saving.load_model(results["model_file"])  # safe_mode, no custom_objects
        self.assertIsInstance(loaded.optimizer, tfmp.LossScaleOptimizer)
        self.assertTrue(any(f.startswith("events") for _, _, files in
                            os.walk(os.path.join(model_dir, "logs")) for f in files))
        self.assertEqual(tfmp.export.serving_signature(export_dir)["outputs"]["output_0"][0],
                         "float32")

    def test_resumes_from_backup_with_optimizer_state(self):
        model_dir = self.tmp_dir()
        kwargs = dict(policy="mixed_float16", steps_per_epoch=4, batch_size=8,
                      model_dir=model_dir, verbose=0)
        first = training.train_and_evaluate(_model, _data(), None, epochs=2, **kwargs)
        keras.backend.clear_session()
        second = training.train_and_evaluate(_model, _data(), None, epochs=3, **kwargs)
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
            results = training.train_and_evaluate(
                _model, _data(), None, policy="float32", epochs=2, steps_per_epoch=4,
                steps_per_execution=2, batch_size=8, verbose=0)
        self.assertEqual((compile_calls[0]["jit_compile"],
                          compile_calls[0]["steps_per_execution"]), ("auto", 2))
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
            training.train_and_evaluate(
                build, _data(nan=True), None, policy="float32", epochs=1, steps_per_epoch=200,
                steps_per_execution=2, batch_size=8, verbose=0)
        optimizer = built[0].optimizer
        self.assertEqual(int(keras.ops.convert_to_numpy(optimizer.skipped_steps)), 100)
        self.assertEqual(int(keras.ops.convert_to_numpy(optimizer.iterations)), 0)
