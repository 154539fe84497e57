"""Tests for tools/benchmark.py: the side-by-side policy benchmark."""

import json
import math
import os
import subprocess
import sys

import keras
from absl.testing import parameterized

import tfmp
from tests import recipe_helpers
from tests.base import TestCase
from tools import benchmark

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save_tiny_model(directory):
    """A Conv/Dense classifier: every activation is float16 under mixed_float16."""
    model = keras.Sequential([
        keras.Input((8, 8, 3)), keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.Flatten(), keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(4, activation="softmax")])
    path = os.path.join(directory, "tiny.keras")
    model.save(path)
    return path


class BenchmarkTest(TestCase):

    def test_benchmark_in_process(self):
        path = _save_tiny_model(self.tmp_dir())
        results = benchmark.benchmark(model_file=path, batch_size=8, steps=2, repeats=2, warmup=1,
                                      isolate=False, progress=False)
        self.assertEqual(list(results["policies"]), list(benchmark.POLICIES))
        self.assertEqual(results["device"], "CPU")
        self.assertRegex(results["max_batch_search"], r"^skipped: no GPU")
        for policy, row in results["policies"].items():
            self.assertGreater(row["examples_per_second"], 0, policy)
            self.assertGreater(row["step_ms"], 0, policy)
            self.assertTrue(math.isfinite(row["final_loss"]), policy)
            self.assertIsNone(row["peak_memory_mib"])  # One process: not per policy.
            self.assertIsNone(row["max_batch_size"])
        f32 = results["policies"]["float32"]
        self.assertEqual((f32["speedup"], f32["activation_memory_ratio"]), (1.0, 1.0))
        # conv 8*8*8 + flatten 512 + dense 16 + softmax head 4 (float32 under every policy).
        self.assertEqual(f32["activation_bytes_per_example"], (512 + 512 + 16 + 4) * 4)
        for policy in ("mixed_float16", "mixed_bfloat16"):
            ratio = results["policies"][policy]["activation_memory_ratio"]
            self.assertLess(ratio, 0.75, policy)
            self.assertGreater(ratio, 0.45, policy)
        table = benchmark.format_table(results)
        for policy in benchmark.POLICIES:
            self.assertRegex(table, rf"\n{policy} +\d")

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

        self.assertEqual(benchmark.find_max_batch(fits, start, limit, tolerance), expected)
        self.assertLess(len(tried), 2 * math.log2(limit) + 2)  # Doubling + bisection.
        self.assertLessEqual(max(tried), limit)

    def test_find_max_batch_tolerance(self):
        size, capped = benchmark.find_max_batch(lambda b: b <= 3000, 32, 65536)
        self.assertFalse(capped)
        self.assertLessEqual(size, 3000)
        self.assertGreaterEqual(size, 3000 * (1 - 2 * benchmark._MAX_BATCH_TOLERANCE))

    @parameterized.named_parameters(
        ("no_float32_first", dict(policies=("mixed_float16", "float32")),
         r"`policies` must list .*float32 first"),
        ("unknown_policy", dict(policies=("float32", "fp8")), r"`policies` must list"),
        ("unknown_model", dict(model="vgg"), r"Unknown `model`: 'vgg'. Expected one of: "
         r"resnet_mini.*transformer"),
        ("batch_size", dict(batch_size=0), r"`batch_size` must be an integer >= 1.*=0"),
        ("missing_file", dict(model_file="/nonexistent.keras"), r"`model_file` is not a file"),
        ("image_size_below_the_models_minimum", dict(model="resnet50", image_size=16),
         r"^`image_size` must be an integer >= 32 for model='resnet50'"),
    )
    def test_bad_arguments(self, kwargs, message):
        with self.assertRaisesRegex(ValueError, message) as raised:
            benchmark.benchmark(isolate=False, progress=False, **kwargs)
        self.assertIsInstance(raised.exception, tfmp.cli.UsageError)  # exit status 2

    def test_cli_json_path_is_checked_first(self):
        tmp = self.tmp_dir()
        result = subprocess.run(
            [sys.executable, "-m", "tools.benchmark", "--model=resnet_mini", f"--json={tmp}"],
            cwd=_REPO, capture_output=True, text=True, timeout=120,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        self.assertEqual(result.returncode, 2, result.stderr[-3000:])
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(recipe_helpers.error_lines(result.stderr),
                         [f"error: `json` is a directory; pass a file path. Received: "
                          f"json={tmp!r}"])
        self.assertNotIn("ex/s", result.stdout + result.stderr)  # nothing was measured

    def test_cli_json_one_process_per_policy(self):
        tmp = self.tmp_dir()
        path = _save_tiny_model(tmp)
        out = os.path.join(tmp, "bench.json")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        result = subprocess.run(
            [sys.executable, "-m", "tools.benchmark", f"--model_file={path}", "--batch_size=8",
             "--steps=2", "--repeats=1", "--warmup=1", f"--json={out}"],
            cwd=_REPO, env=env, capture_output=True, text=True, timeout=300)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn("one process per policy", result.stdout)
        with open(out) as f:
            results = json.load(f)
        self.assertEqual(list(results["policies"]), list(benchmark.POLICIES))
        for policy, row in results["policies"].items():
            self.assertGreater(row["examples_per_second"], 0, policy)
            self.assertGreater(row["peak_memory_mib"], 100, policy)  # TensorFlow alone is more.
            self.assertEqual(row["memory_kind"], "process_peak_rss")
            self.assertIsNotNone(row["memory_ratio"])
        self.assertLess(results["policies"]["mixed_float16"]["activation_memory_ratio"], 0.75)

    def test_cli_bad_argument(self):
        result = subprocess.run(
            [sys.executable, "-m", "tools.benchmark", "--policies=mixed_float16"],
            cwd=_REPO, capture_output=True, text=True, timeout=120,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        self.assertEqual(result.returncode, 2)
        self.assertNotIn("Traceback", result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        self.assertEqual(len(errors), 1, result.stderr)
        self.assertRegex(errors[0], r"`policies` must list")
