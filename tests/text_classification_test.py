"""Tests for recipes.text_classification: `run` with injected data, TFDS, the CLI."""

import itertools
import types
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl.testing import parameterized

import tfmp
from recipes import text_classification
from tests import recipe_helpers
from tests.base import TestCase


def _run(**settings):
    return recipe_helpers.run_recipe(text_classification, **settings)



class TextClassificationTest(TestCase):
    def test_injected_dataset(self):
        rng = np.random.default_rng(0)
        x = rng.integers(0, 100, (32, 16)).astype("int32")
        y = (x[:, 0] > 50).astype("int32")
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        results = _run(
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
            results = _run(
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
        results = _run(
            seq_len=32, vocab_size=1000, embed_dim=32, num_heads=2, num_layers=1, batch_size=32,
            epochs=2, steps_per_epoch=10, num_synthetic=512, learning_rate=1e-3, verbose=0)
        self.assertGreater(results["eval_accuracy"], 0.8)  # 2 classes: chance is 0.5

    def test_imdb_through_tfds(self):
        with tfds.testing.mock_data(num_examples=16):
            results = _run(
                dataset="imdb_reviews", seq_len=16, vocab_size=200, embed_dim=16, num_heads=2,
                num_layers=1, batch_size=4, epochs=1, steps_per_epoch=5, verbose=0)
        # The first steps may overflow at the initial scale 2**15 and be skipped.
        self.assertEqual(results["optimizer_steps"] + results["skipped_steps"], 5)
        self.assertGreaterEqual(results["optimizer_steps"], 1)
        self.assertTrue(np.isfinite(results["eval_loss"]))

    @parameterized.named_parameters(
        ("heads_not_dividing", ["--num_heads=3"],
         "error: `num_heads` must divide `embed_dim` (64). Received: num_heads=3"),
        ("zero_heads", ["--num_heads=0"],
         "error: `num_heads` must be an integer >= 1. Received: num_heads=0"),
        ("vocab_size", ["--vocab_size=1"], "error: `vocab_size` must be an integer >= 2"),
    )
    def test_bad_input_is_one_line(self, flags, message):
        proc = recipe_helpers.run_cli("recipes.text_classification", *flags)
        self.assertEqual(proc.returncode, 2, proc.stderr)
        lines = recipe_helpers.error_lines(proc.stderr)
        self.assertEqual(len(lines), 1, proc.stderr)
        self.assertTrue(lines[0].startswith(message), lines[0])


def _tokens(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 50, (n, 8)).astype("int32")
    return x, (x[:, 0] > 25).astype("int32")


_TINY = dict(seq_len=8, vocab_size=50, embed_dim=8, num_heads=2, num_layers=1, ff_dim=8,
             dropout=0.0, policy="float32", verbose=0)


def _weights(results) -> dict:
    """The trained model's weights by path, from `model_dir/model.keras` (safe mode)."""
    model = tfmp.cli.load_keras_file(results["model_file"], compile=True)
    return {v.path: v.numpy() for v in model.weights}, model


class TrainingFlagsTest(TestCase):
    """Issue 11: each optimizer flag through `run()` with injected data."""

    def _run(self, x, y, batch, **settings):
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
        return _run(**_TINY, batch_size=batch, epochs=1, dataset_override=(data, data),
                    model_dir=self.tmp_dir(), **settings)

    def test_accumulating_two_batches_equals_one_twice_the_size(self):
        x, y = _tokens(16)
        # SGD: the update is linear in the gradient (Adam's first step is ~lr * sign(g),
        # which turns rounding-level differences of near-zero gradients into lr-sized ones).
        settings = dict(optimizer="sgd", momentum=0.0, learning_rate=0.5)
        one, _ = _weights(self._run(x, y, 16, **settings))
        keras.backend.clear_session()
        results = self._run(x, y, 8, grad_accum_steps=2, **settings)
        two, _ = _weights(results)
        self.assertEqual(results["optimizer_steps"], 1)  # 2 batches, 1 optimizer step
        self.assertEqual(one.keys(), two.keys())
        moved = 0
        for path in one:
            np.testing.assert_allclose(two[path], one[path], rtol=1e-4, atol=1e-6, err_msg=path)
            moved += path.endswith("kernel")
        self.assertGreater(moved, 4)

    def test_weight_decay_leaves_biases_and_normalisation_alone(self):
        x, y = _tokens(8)
        settings = dict(optimizer="sgd", momentum=0.0, learning_rate=1e-3)
        plain, _ = _weights(self._run(x, y, 8, **settings))
        keras.backend.clear_session()
        decayed, _ = _weights(self._run(x, y, 8, weight_decay=0.5, **settings))
        excluded = [p for p in plain if p.rsplit("/", 1)[-1] in ("bias", "gamma", "beta")]
        self.assertGreater(len(excluded), 5)
        for path in plain:
            if path in excluded:  # the same update with and without decay
                np.testing.assert_array_equal(decayed[path], plain[path], err_msg=path)
            else:  # one step: w1 = w0 - lr * g - lr * wd * w0
                np.testing.assert_allclose(plain[path] - decayed[path],
                                           1e-3 * 0.5 * plain[path], atol=2e-6, err_msg=path)

    def test_label_smoothing_matches_a_hand_computed_loss(self):
        x, y = _tokens(8)
        results = self._run(x, y, 8, label_smoothing=0.2)
        _, model = _weights(results)
        probs = model.predict(x, verbose=0).astype("float64")
        target = np.full_like(probs, 0.2 / 2) + 0.8 * np.eye(2)[y]
        expected = float(np.mean(-np.sum(target * np.log(probs), axis=1)))
        self.assertAlmostEqual(results["eval_loss"], expected, places=4)
        plain = float(np.mean(-np.log(probs[np.arange(8), y])))
        self.assertGreater(abs(expected - plain), 1e-3)  # smoothing changed the value

    def test_sgd_settings_schedule_and_scaling_reach_the_saved_optimizer(self):
        x, y = _tokens(32)
        results = self._run(x, y, 8, optimizer="sgd", momentum=0.875, nesterov=True,
                            clipnorm=1.0, learning_rate=0.1, lr_scaling="linear",
                            reference_batch_size=16, lr_schedule="step", step_boundaries=(2,),
                            step_factor=0.1, steps_per_epoch=4)
        _, model = _weights(results)
        inner = model.optimizer.inner_optimizer
        self.assertIsInstance(inner, keras.optimizers.SGD)
        self.assertEqual((inner.momentum, inner.nesterov, inner.clipnorm), (0.875, True, 1.0))
        # 0.1 * 8 / 16, times 0.1 after step 2 of 4.
        self.assertAlmostEqual(results["learning_rate"], 0.005, places=7)

    @parameterized.named_parameters(("adamw", "adamw", keras.optimizers.AdamW),
                                    ("lamb", "lamb", keras.optimizers.Lamb))
    def test_optimizer_choice(self, name, cls):
        x, y = _tokens(8)
        results = self._run(x, y, 8, optimizer=name, weight_decay=0.01)
        _, model = _weights(results)
        self.assertIsInstance(model.optimizer.inner_optimizer, cls)
        self.assertEqual(model.optimizer.inner_optimizer.weight_decay, 0.01)
        self.assertTrue(all(np.isfinite(w).all() for w in _weights(results)[0].values()))
