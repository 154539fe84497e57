"""Tests for recipes.image_classification: `run` with injected data, TFDS, the CLI."""

import itertools
import json
import os
import signal
import subprocess
import time
import types
from unittest import mock

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl.testing import parameterized

import tfmp
from recipes import image_classification
from tests import recipe_helpers
from tests.base import TestCase

MODULE = "recipes.image_classification"


def _run(**settings):
    return recipe_helpers.run_recipe(image_classification, **settings)



class RunTest(TestCase):
    def test_injected_dataset_trains_and_exports_float32(self):
        rng = np.random.default_rng(0)
        x = rng.random((32, 16, 16, 3), dtype=np.float32)
        y = rng.integers(0, 10, 32).astype("int32")
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        export_dir = os.path.join(self.tmp_dir(), "export")
        results = _run(
            dataset="synthetic", image_size=16, batch_size=8, epochs=1, steps_per_epoch=3,
            export_dir=export_dir, dataset_override=(data, data), verbose=0)
        self.assertEqual(results["policy"], "mixed_float16")
        self.assertEqual(results["optimizer_steps"], 3)
        self.assertTrue(np.isfinite(results["loss"]))
        served = tf.saved_model.load(export_dir).signatures["serving_default"](
            tf.constant(x[:2]))
        self.assertEqual(served["output_0"].dtype, tf.float32)
        np.testing.assert_allclose(served["output_0"].numpy().sum(axis=1), [1, 1], rtol=1e-5)

    @parameterized.named_parameters(("mixed_float16", "mixed_float16"),
                                    ("mixed_bfloat16", "mixed_bfloat16"), ("float32", "float32"))
    def test_one_nan_pixel_leaves_the_model_usable(self, policy):
        # Issue 9: the forward pass of a NaN batch wrote NaN into every batch-norm
        # statistic of resnet_mini; evaluation and the export then served NaN.
        rng = np.random.default_rng(0)
        x = rng.random((32, 16, 16, 3), dtype=np.float32)
        y = rng.integers(0, 10, 32).astype("int32")
        x_bad = x.copy()
        x_bad[9, 3, 4, 1] = np.nan  # one pixel of the second batch
        train = tf.data.Dataset.from_tensor_slices((x_bad, y)).batch(8)
        evaluation = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        export_dir = os.path.join(self.tmp_dir(), "export")
        results = _run(
            dataset="synthetic", image_size=16, batch_size=8, epochs=1, policy=policy,
            export_dir=export_dir, dataset_override=(train, evaluation), verbose=0)
        self.assertEqual(results["skipped_steps"], 1)
        self.assertEqual(results["optimizer_steps"], 3)
        self.assertTrue(np.isfinite(results["eval_loss"]), results)
        served = tf.saved_model.load(export_dir).signatures["serving_default"](
            tf.constant(x[:4]))["output_0"].numpy()
        self.assertTrue(np.isfinite(served).all())

    def test_steps_per_execution_throughput_counts_steps(self):
        rng = np.random.default_rng(0)
        x = rng.random((32, 8, 8, 3), dtype=np.float32)
        y = rng.integers(0, 10, 32).astype("int32")
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        # Throughput's clock: one second per reading (epoch start, each batch-end call).
        clock = types.SimpleNamespace(perf_counter=itertools.count().__next__)
        with mock.patch.object(tfmp.callbacks, "time", clock):
            results = _run(
                dataset="synthetic", image_size=8, batch_size=8, epochs=2, steps_per_epoch=4,
                steps_per_execution=2, dataset_override=(data, data), verbose=0)
        self.assertEqual(results["optimizer_steps"] + results["skipped_steps"], 8)
        self.assertEqual(results["steps_per_execution"], 2)
        self.assertFalse(results["jit_compile"])  # "auto" on a CPU
        # 4 steps of 8 examples per epoch, in 2 calls: 2 clock seconds.
        self.assertEqual(results["examples_per_second"], [16.0, 16.0])

    def test_synthetic_default_learns(self):
        results = _run(
            batch_size=32, epochs=3, steps_per_epoch=8, num_synthetic=512, learning_rate=3e-3,
            verbose=0)
        # 10 classes: chance is 0.1.
        self.assertGreater(results["eval_accuracy"], 0.3)
        self.assertEqual(results["skipped_steps"], 0)

    def test_cifar10_through_tfds(self):
        with tfds.testing.mock_data(num_examples=16):
            results = _run(
                dataset="cifar10", batch_size=4, epochs=1, steps_per_epoch=2,
                policy="mixed_bfloat16", verbose=0)
        self.assertEqual(results["policy"], "mixed_bfloat16")
        self.assertEqual(results["optimizer_steps"], 2)
        self.assertTrue(np.isfinite(results["eval_loss"]))


def _nothing_built():
    """Patches that fail the test if the recipe builds a model or a dataset."""
    built = AssertionError("built a model or a dataset before refusing the arguments")
    return (mock.patch.object(tfmp.models, "image_classifier", side_effect=built),
            mock.patch.object(tfmp.data, "image_dataset", side_effect=built))


class EarlyChecksTest(TestCase):
    """Arguments refused before any model or dataset is built (issue 9, items 1 to 4)."""

    def _refused(self, message, **kwargs):
        model_patch, data_patch = _nothing_built()
        with model_patch, data_patch, self.assertRaisesRegex(tfmp.training.UsageError, message):
            _run(batch_size=4, epochs=1, steps_per_epoch=1,
                                     num_synthetic=8, verbose=0, **kwargs)

    @parameterized.named_parameters(
        ("model_dir_is_a_file", dict(model_dir="afile"),
         r"^`model_dir` exists and is not a directory"),
        ("export_dir_under_a_file", dict(export_dir="afile/export"),
         r"^`export_dir` cannot be created: '.*afile' is not a directory"),
        ("export_dir_inside_model_dir", dict(model_dir="run", export_dir="run/export"),
         r"^`export_dir` must be outside `model_dir` and not contain it"),
    )
    def test_output_paths(self, paths, message):  # item 1
        directory, _ = self.tmp_dir_with_a_file()
        self._refused(message, **{k: os.path.join(directory, v) for k, v in paths.items()})

    def test_read_only_export_parent(self):  # item 1; root ignores modes: mock os.access
        parent = self.tmp_dir()
        with mock.patch("os.access", return_value=False):
            self._refused(r"^`export_dir` cannot be written: '.*' is read-only",
                          export_dir=os.path.join(parent, "export"))

    @parameterized.named_parameters(
        ("mobilenet_v2", "mobilenet_v2", 16), ("resnet50", "resnet50", 31),
        ("efficientnet_b0", "efficientnet_b0", 8))
    def test_image_size_below_the_models_minimum(self, model, size):  # item 3
        self._refused(rf"^`image_size` must be an integer >= 32 for model='{model}' "
                      rf"\(keras.applications' minimum; resnet_mini takes any size\). "
                      rf"Received: image_size={size}$", model=model, image_size=size)

    def test_minimum_image_sizes(self):
        for model in ("mobilenet_v2", "resnet50", "efficientnet_b0"):
            self.assertEqual(tfmp.models.MIN_IMAGE_SIZE[model], 32)
            tfmp.models.validate_image_model(model, image_size=32)
        tfmp.models.validate_image_model("resnet_mini", image_size=1)

    @parameterized.named_parameters(
        ("not_json", "{cluster", r"^TF_CONFIG is not valid JSON \(Expecting"),
        ("no_cluster", '{"task": {"type": "worker", "index": 0}}', r'^TF_CONFIG has no "cluster"'))
    def test_bad_tf_config(self, tf_config, message):  # item 4
        with mock.patch.dict(os.environ, {"TF_CONFIG": tf_config}):
            self._refused(message, distribution="multi_worker")

    def test_resume_with_another_model_is_refused(self):  # item 2
        model_dir = self.tmp_dir()
        _run(image_size=8, batch_size=4, epochs=1, steps_per_epoch=1,
                                 num_synthetic=8, model_dir=model_dir, verbose=0)
        with mock.patch.object(tfmp.models, "image_classifier",
                               side_effect=AssertionError("built the model")):
            with self.assertRaisesRegex(
                    tfmp.training.UsageError,
                    r"^`model_dir` holds a run with image_size=8, model='resnet_mini'; this run "
                    r"has image_size=32, model='mobilenet_v2'. Pass the same settings to resume "
                    r"that run, or a new --model_dir for a new run."):
                _run(model="mobilenet_v2", image_size=32, batch_size=4,
                                         epochs=1, steps_per_epoch=1, num_synthetic=8,
                                         model_dir=model_dir, verbose=0)
        with open(os.path.join(model_dir, "config.json")) as f:
            recorded = json.load(f)
        self.assertEqual(recorded["model"], {"model": "resnet_mini", "image_size": 8})
        self.assertEqual(recorded["config"]["recipe"], "image_classification")
        self.assertEqual(recorded["resumes"], [])


class CommandLineTest(TestCase):
    # One case per kind of check (each value check is in tests/run_config_test.py):
    # the config, a model flag, absl's parsing, an enum, a path, TF_CONFIG.
    @parameterized.named_parameters(
        ("policy", ["--policy=fp16"], "Unknown `policy`: 'fp16'. Expected one of: "
         "mixed_float16, mixed_bfloat16, float32, auto."),
        ("model", ["--model=vgg"], "Unknown `model`: 'vgg'"),
        ("optimizer", ["--optimizer=rmsprop"], "error: `optimizer` must be one of sgd, adam, "
         "adamw, lamb. Received: optimizer='rmsprop'"),
        ("step_boundaries", ["--lr_schedule=step", "--step_boundaries=10,x"],
         "error: `step_boundaries` must be comma-separated integers (steps). Received: "
         "step_boundaries='10,x'"),
        ("multi_worker", ["--distribution=multi_worker"], "needs the TF_CONFIG environment"),
        ("export_dir", ["--export_dir=/etc"], "`export_dir` is a non-empty directory that "
         "holds no SavedModel"),
        ("batch_size_not_an_integer", ["--batch_size=abc"],  # item 5: absl's error, one line
         "error: flag --batch_size=abc: invalid literal for int() with base 10: 'abc' "
         "(--helpfull lists the flags)"),
        ("positional_argument", ["train"], "error: unexpected arguments"),
        ("steps_per_execution_not_dividing", ["--steps_per_epoch=6", "--steps_per_execution=4"],
         "error: `steps_per_epoch` must be a multiple of `steps_per_execution`"),
        ("jit_compile", ["--jit_compile=maybe"],
         "error: flag --jit_compile=maybe: value should be one of <auto|true|false>"),
    )
    def test_bad_input_is_one_line(self, flags, message):
        proc = recipe_helpers.run_cli(MODULE, *flags)
        self.assertEqual(proc.returncode, 2, proc.stderr)
        lines = recipe_helpers.error_lines(proc.stderr)
        self.assertEqual(len(lines), 1, proc.stderr)
        self.assertIn(message, lines[0])
        self.assertNotIn("Traceback", proc.stderr)

    def test_missing_tfds_dataset_says_how_to_prepare(self):
        proc = recipe_helpers.run_cli(MODULE, "--dataset=cifar10", f"--data_dir={self.tmp_dir()}")
        self.assertEqual(proc.returncode, 2, proc.stderr)
        lines = recipe_helpers.error_lines(proc.stderr)
        self.assertEqual(len(lines), 1, proc.stderr)
        self.assertIn("download_and_prepare", lines[0])

    def test_sigkill_mid_run_then_resume(self):
        model_dir = self.tmp_dir()
        cmd = recipe_helpers.command(
            MODULE, "--epochs=6", "--steps_per_epoch=6", "--batch_size=16", "--image_size=16",
            "--num_synthetic=256", f"--model_dir={model_dir}")
        proc = subprocess.Popen(cmd, cwd=recipe_helpers.REPO, env=recipe_helpers.ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        latest = os.path.join(model_dir, "backup", "latest")
        deadline = time.time() + 240
        while not os.path.exists(latest) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # into the next epoch
        proc.send_signal(signal.SIGKILL)
        self.assertEqual(proc.wait(), -signal.SIGKILL, "the run ended before it was killed")
        with open(os.path.join(latest, "training_metadata.json")) as f:
            done = json.load(f)["epoch"]
        self.assertGreaterEqual(done, 1)
        resumed = subprocess.run(cmd, cwd=recipe_helpers.REPO, env=recipe_helpers.ENV,
                                 capture_output=True, text=True, timeout=300)
        self.assertEqual(resumed.returncode, 0, resumed.stderr[-3000:])
        results = recipe_helpers.results_of(resumed.stdout)
        self.assertEqual(results["epochs_run"], 6 - done)
        self.assertEqual(results["optimizer_steps"], 36)  # optimizer state came back
