"""Tests for tfmp/benchmark_runner.py: the backend pieces and the largest-batch search."""

import math
from unittest import mock

import numpy as np
from absl.testing import parameterized

from tests.base import TestCase
from tfmp import benchmark_models
from tfmp import benchmark_runner as runner


class BenchmarkRunnerTest(TestCase):

    def test_backend_pieces_on_a_cpu(self):
        self.assertEqual(runner.device_name(), "CPU")
        peak, kind = runner.peak_memory_mib()
        self.assertEqual(kind, "process_peak_rss")
        self.assertGreater(peak, 50)
        self.assertTrue(runner.is_out_of_memory(
            RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 GiB")))
        self.assertFalse(runner.is_out_of_memory(ValueError("shapes differ")))

    @parameterized.named_parameters(
        ("exact", 1000, 32, 65536, 0.0, (1000, False)),
        ("capped", 10**9, 32, 4096, 0.0, (4096, True)),
        ("start_too_big", 5, 32, 65536, 0.0, (5, False)),
        ("nothing_fits", 0, 32, 65536, 0.0, (0, False)),
    )
    def test_find_max_batch(self, boundary, start, limit, tolerance, expected):
        tried = []

        def fits(batch):
            tried.append(batch)
            return batch <= boundary

        self.assertEqual(runner.find_max_batch(fits, start, limit, tolerance), expected)
        self.assertLess(len(tried), 2 * math.log2(limit) + 2)  # Doubling + bisection.
        self.assertLessEqual(max(tried), limit)

    def test_find_max_batch_tolerance(self):
        size, capped = runner.find_max_batch(lambda b: b <= 3000, 32, 65536)
        self.assertFalse(capped)
        self.assertLessEqual(size, 3000)
        self.assertGreaterEqual(size, 3000 * (1 - 2 * runner.MAX_BATCH_TOLERANCE))

    def test_search_max_batch_builds_anew_after_running_out_of_memory(self):
        builds, tried = [], []

        class Model:  # Runs out of memory above 100 examples.
            def train_on_batch(self, x, y):
                tried.append(x.shape[0])
                if x.shape[0] > 100:
                    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1 GiB")

        def build(spec):
            builds.append(len(tried))
            return Model(), np.zeros((spec.batch_size, 3), "float32"), np.zeros(spec.batch_size)

        spec = runner.Spec(name="mixed_float16", policy="mixed_float16",
                           model=benchmark_models.ModelConfig("mlp"), batch_size=8, warmup=0,
                           jit_compile=True, seed=0)
        with mock.patch.object(runner, "_build", build):
            found = runner.search_max_batch(spec, limit=4096)
        self.assertEqual(found, runner.find_max_batch(lambda b: b <= 100, 8, 4096))
        self.assertGreaterEqual(found[0], 100 * (1 - 2 * runner.MAX_BATCH_TOLERANCE))
        # A fresh model for the first try and for every try after a failed one.
        after_failures = [i + 1 for i, b in enumerate(tried[:-1]) if b > 100]
        self.assertEqual(builds, [0] + after_failures)
        self.assertIn(128, tried)

        def broken(spec):
            model, x, y = build(spec)
            model.train_on_batch = mock.Mock(side_effect=ValueError("a bug"))
            return model, x, y

        with mock.patch.object(runner, "_build", broken):
            with self.assertRaisesRegex(ValueError, "a bug"):  # only out of memory is "no fit"
                runner.search_max_batch(spec, limit=4096)
