"""Tests for recipes.text_classification: `run` with injected data, TFDS, the CLI."""

import itertools
import types
from unittest import mock

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl.testing import parameterized

import tfmp
from recipes import text_classification
from tests import recipe_helpers
from tests.base import TestCase


class TextClassificationTest(TestCase):
    def test_injected_dataset(self):
        rng = np.random.default_rng(0)
        x = rng.integers(0, 100, (32, 16)).astype("int32")
        y = (x[:, 0] > 50).astype("int32")
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        results = text_classification.run(
            seq_len=16, vocab_size=100, embed_dim=16, num_heads=2, num_layers=1, batch_size=8,
            epochs=1, steps_per_epoch=4, dataset_override=(data, data), verbose=0)
        self.assertEqual(results["optimizer_steps"] + results["skipped_steps"], 4)
        self.assertTrue(np.isfinite(results["loss"]))

    def test_steps_per_execution_throughput_counts_steps(self):
        rng = np.random.default_rng(0)
        x = rng.integers(0, 100, (32, 16)).astype("int32")
        y = (x[:, 0] > 50).astype("int32")
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        # Throughput's clock: one second per reading (epoch start, each batch-end call).
        clock = types.SimpleNamespace(perf_counter=itertools.count().__next__)
        with mock.patch.object(tfmp.callbacks, "time", clock):
            results = text_classification.run(
                seq_len=16, vocab_size=100, embed_dim=16, num_heads=2, num_layers=1,
                batch_size=8, epochs=1, steps_per_epoch=8, steps_per_execution=4,
                dataset_override=(data, data), verbose=0)
        self.assertEqual(results["optimizer_steps"] + results["skipped_steps"], 8)
        # 8 steps of 8 examples in 2 calls of 4 steps: 2 clock seconds.
        self.assertEqual(results["examples_per_second"], [32.0])

    def test_command_line_steps_per_execution_and_jit_compile(self):
        proc = recipe_helpers.run_cli(
            "recipes.text_classification", "--steps_per_execution=2", "--jit_compile=FALSE",
            "--steps_per_epoch=4", "--epochs=1", "--batch_size=8", "--num_synthetic=32",
            "--seq_len=8", "--vocab_size=50", "--embed_dim=8", "--num_heads=2",
            "--num_layers=1")
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        results = recipe_helpers.results_of(proc.stdout)
        self.assertEqual((results["steps_per_execution"], results["jit_compile"]), (2, False))
        self.assertEqual(results["optimizer_steps"] + results["skipped_steps"], 4)
        self.assertGreater(results["examples_per_second"][0], 0)

    def test_synthetic_text_learns(self):
        results = text_classification.run(
            seq_len=32, vocab_size=1000, embed_dim=32, num_heads=2, num_layers=1, batch_size=32,
            epochs=2, steps_per_epoch=10, num_synthetic=512, learning_rate=1e-3, verbose=0)
        self.assertGreater(results["eval_accuracy"], 0.8)  # 2 classes: chance is 0.5

    def test_imdb_through_tfds(self):
        with tfds.testing.mock_data(num_examples=16):
            results = text_classification.run(
                dataset="imdb_reviews", seq_len=16, vocab_size=200, embed_dim=16, num_heads=2,
                num_layers=1, batch_size=4, epochs=1, steps_per_epoch=5, verbose=0)
        # The first steps may overflow at the initial scale 2**15 and be skipped.
        self.assertEqual(results["optimizer_steps"] + results["skipped_steps"], 5)
        self.assertGreaterEqual(results["optimizer_steps"], 1)
        self.assertTrue(np.isfinite(results["eval_loss"]))

    @parameterized.named_parameters(
        ("heads_not_dividing", ["--num_heads=3"],
         "error: `num_heads` must divide `embed_dim` (64). Received: num_heads=3"),
        ("zero_heads", ["--num_heads=0"], "error: `num_heads` must be >= 1. Received: num_heads=0"),
        ("vocab_size", ["--vocab_size=1"], "error: `vocab_size` must be an integer >= 2"),
    )
    def test_bad_input_is_one_line(self, flags, message):
        proc = recipe_helpers.run_cli("recipes.text_classification", *flags)
        self.assertEqual(proc.returncode, 2, proc.stderr)
        lines = recipe_helpers.error_lines(proc.stderr)
        self.assertEqual(len(lines), 1, proc.stderr)
        self.assertTrue(lines[0].startswith(message), lines[0])
