"""Tests for recipes.image_classification: `run` with injected data, TFDS, the CLI."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl.testing import parameterized

from recipes import image_classification
from tests import recipe_helpers
from tests.base import TestCase

MODULE = "recipes.image_classification"


class RunTest(TestCase):
    def test_injected_dataset_trains_and_exports_float32(self):
        rng = np.random.default_rng(0)
        x = rng.random((32, 16, 16, 3), dtype=np.float32)
        y = rng.integers(0, 10, 32).astype("int32")
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        export_dir = os.path.join(self.tmp_dir(), "export")
        results = image_classification.run(
            dataset="synthetic", image_size=16, batch_size=8, epochs=1, steps_per_epoch=3,
            export_dir=export_dir, dataset_override=(data, data), verbose=0)
        self.assertEqual(results["policy"], "mixed_float16")
        self.assertEqual(results["optimizer_steps"], 3)
        self.assertTrue(np.isfinite(results["loss"]))
        served = tf.saved_model.load(export_dir).signatures["serving_default"](
            tf.constant(x[:2]))
        self.assertEqual(served["output_0"].dtype, tf.float32)
        np.testing.assert_allclose(served["output_0"].numpy().sum(axis=1), [1, 1], rtol=1e-5)

    def test_synthetic_default_learns(self):
        results = image_classification.run(
            batch_size=32, epochs=3, steps_per_epoch=8, num_synthetic=512, learning_rate=3e-3,
            verbose=0)
        # 10 classes: chance is 0.1.
        self.assertGreater(results["eval_accuracy"], 0.3)
        self.assertEqual(results["skipped_steps"], 0)

    def test_cifar10_through_tfds(self):
        with tfds.testing.mock_data(num_examples=16):
            results = image_classification.run(
                dataset="cifar10", batch_size=4, epochs=1, steps_per_epoch=2,
                policy="mixed_bfloat16", verbose=0)
        self.assertEqual(results["policy"], "mixed_bfloat16")
        self.assertEqual(results["optimizer_steps"], 2)
        self.assertTrue(np.isfinite(results["eval_loss"]))


class CommandLineTest(TestCase):
    @parameterized.named_parameters(
        ("policy", ["--policy=fp16"], "Unknown `policy`: 'fp16'. Expected one of: "
         "mixed_float16, mixed_bfloat16, float32, auto."),
        ("dataset", ["--dataset=mnist"], "Expected one of: synthetic, cifar10, imagenet2012."),
        ("batch_size", ["--batch_size=0"], "`batch_size` must be a positive integer"),
        ("loss_scale", ["--loss_scale=-1"], "`loss_scale` must be 'dynamic' or a positive"),
        ("model", ["--model=vgg"], "Unknown `model`: 'vgg'"),
        ("learning_rate", ["--learning_rate=inf"], "`learning_rate` must be a positive finite"),
        ("seed", ["--seed=-1"], "`seed` must be an integer >= 0"),
        ("cpu_replicas", ["--cpu_replicas=0"], "`cpu_replicas` must be an integer >= 1"),
        ("num_synthetic", ["--num_synthetic=0"], "`num_synthetic` must be a positive integer"),
        ("multi_worker", ["--distribution=multi_worker"], "needs the TF_CONFIG environment"),
        ("export_dir", ["--export_dir=/etc"], "`export_dir` is a non-empty directory that "
         "holds no SavedModel"),
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
