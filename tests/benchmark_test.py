"""Tests for tfmp/benchmark.py, the side-by-side policy benchmark, and its program
tools/benchmark.py, on both backends."""

import importlib.util
import json
import math
import os
import re
import subprocess
import unittest

import keras
from absl.testing import parameterized

import tfmp
from tests import recipe_helpers
from tests.base import BACKEND, TestCase
from tfmp import benchmark

_TINY = {  # The new models at smoke-test size (resnet50: tests/benchmark_models_test.py).
    "transformer": dict(hidden=32, num_heads=2, seq_len=16, num_layers=1, batch_size=4),
    "mlp": dict(hidden=64, num_layers=2, batch_size=16),
}
_QUICK = dict(steps=1, repeats=2, warmup=1, isolate=False, progress=False)


def _save_tiny_model(directory):
    """A Conv/Dense classifier: every activation is float16 under mixed_float16."""
    model = keras.Sequential([
        keras.Input((8, 8, 3)), keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.Flatten(), keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(4, activation="softmax")])
    path = os.path.join(directory, "tiny.keras")
    model.save(path)
    return path


def _run(*flags, backend="tensorflow", tensorflow_marker=None, timeout=300):
    """`python -m tools.benchmark FLAGS` under `backend`.

    With `tensorflow_marker`, a stand-in `tensorflow` package comes first on the path (also in
    the spawned workers): importing it fails, as on a machine without TensorFlow, and writes
    the marker file, so a test sees any attempt.
    """
    env = dict(recipe_helpers.ENV, KERAS_BACKEND=backend)
    if tensorflow_marker:
        fake = os.path.join(os.path.dirname(tensorflow_marker), "fake_site")
        os.makedirs(os.path.join(fake, "tensorflow"))
        with open(os.path.join(fake, "tensorflow", "__init__.py"), "w") as f:
            f.write(f"open({tensorflow_marker!r}, 'w').close()\n"
                    "raise ImportError('no TensorFlow on this machine')\n")
        env["PYTHONPATH"] = os.pathsep.join([fake, recipe_helpers.REPO])
    return subprocess.run(recipe_helpers.command("tools.benchmark", *flags),
                          cwd=recipe_helpers.REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


class BenchmarkTest(TestCase):

    def assertRows(self, results, names):
        self.assertEqual(list(results["policies"]), list(names))
        self.assertEqual(results["baseline"], names[0])
        for name, row in results["policies"].items():
            self.assertGreater(row["examples_per_second"], 0, name)
            self.assertGreater(row["step_ms"], 0, name)
            self.assertGreater(row["speedup"], 0, name)
            self.assertTrue(math.isfinite(row["final_loss"]), name)
            self.assertIsNone(row["max_batch_size"], name)  # no GPU
        base = results["policies"][names[0]]
        self.assertEqual((base["speedup"], base["step_time_ratio"]), (1.0, 1.0))
        self.assertEqual(base["activation_memory_ratio"], 1.0)
        table = benchmark.format_table(results)
        for name in names:
            self.assertRegex(table, rf"\n{name} +\d")
        return table

    def test_model_file_in_process(self):
        path = _save_tiny_model(self.tmp_dir())
        results = benchmark.benchmark(model_file=path, batch_size=8, optimizer_overhead=False,
                                      **_QUICK)
        self.assertRows(results, benchmark.POLICIES)
        self.assertEqual((results["device"], results["backend"]), ("CPU", BACKEND))
        self.assertEqual(results["float32_mode"], "float32 (no TF32 on a CPU)")
        self.assertRegex(results["max_batch_search"], r"^skipped: no GPU")
        self.assertIsNone(results["optimizer_overhead"])
        for policy, row in results["policies"].items():
            self.assertIsNone(row["peak_memory_mib"])  # One process: not per policy.
            self.assertEqual((row["policy"], row["tf32"]), (policy, True))
        f32 = results["policies"]["float32"]
        # conv 8*8*8 + flatten 512 + dense 16 + softmax head 4 (float32 under every policy).
        self.assertEqual(f32["activation_bytes_per_example"], (512 + 512 + 16 + 4) * 4)
        for policy in ("mixed_float16", "mixed_bfloat16"):
            ratio = results["policies"][policy]["activation_memory_ratio"]
            self.assertLess(ratio, 0.75, policy)
            self.assertGreater(ratio, 0.45, policy)

    @parameterized.named_parameters(
        ("transformer", "transformer", False, False),
        ("mlp_with_the_optimizer_overhead", "mlp", True, True))
    def test_model_in_process(self, name, jit_compile, optimizer_overhead):
        sizes = _TINY[name]
        results = benchmark.benchmark(model=name, policies=("float32", "mixed_float16"),
                                      jit_compile=jit_compile,
                                      optimizer_overhead=optimizer_overhead, **sizes, **_QUICK)
        table = self.assertRows(results, ("float32", "mixed_float16"))
        self.assertEqual({k: results["config"][k] for k in sizes}, sizes)
        self.assertEqual(results["config"]["jit_compile"], jit_compile)
        self.assertIn(f"{name} (", table.splitlines()[0])
        f32, f16 = results["policies"]["float32"], results["policies"]["mixed_float16"]
        self.assertEqual(f16["params"], f32["params"])
        if name == "transformer":
            self.assertEqual(results["config"]["ff_dim"], 128)  # 4 * hidden by default
            self.assertLess(f16["activation_memory_ratio"], 0.55)
        else:  # 2 * Dense(64) + a float32 1000-class head: 4000 of the 4512 bytes stay float32.
            self.assertEqual(f32["params"], 2 * (64 * 64 + 64) + 64 * 1000 + 1000)
            self.assertEqual(f32["activation_bytes_per_example"], (2 * 64 + 1000) * 4)
            self.assertEqual(f16["activation_bytes_per_example"], 2 * 64 * 2 + 1000 * 4)
        if not optimizer_overhead:
            self.assertIsNone(results["optimizer_overhead"])
            self.assertIn("Optimizer overhead: skipped", table)
            return
        overhead = results["optimizer_overhead"]
        self.assertEqual(overhead["policy"], "mixed_float16")
        self.assertEqual(list(overhead["optimizers"]), ["plain", "keras", "tfmp"])
        self.assertEqual(overhead["optimizers"]["plain"]["step_time_ratio"], 1.0)
        for kind, row in overhead["optimizers"].items():
            self.assertEqual(row["policy"], "mixed_float16", kind)
            self.assertGreater(row["step_time_ratio"], 0, kind)
            self.assertGreater(row["cpu_time_ratio"], 0, kind)
        self.assertRegex(table, r"\nLoss-scaling overhead, mixed_float16")
        for label in benchmark.OPTIMIZERS.values():
            self.assertRegex(table, rf"\n{re.escape(label)} +\d+\.\d+ +\d+\.\d{{3}}x")

    @parameterized.named_parameters(
        ("gpu_tf32", True, True, ["float32 (tf32)", "float32 (highest)", "mixed_float16"],
         [True, False, True]),
        ("gpu_tf32_not_strict", True, False, ["float32 (tf32)", "mixed_float16"], [True, True]),
        ("cpu", False, True, ["float32", "mixed_float16"], [True, True]),
    )
    def test_variants(self, tf32, strict, names, tf32_flags):
        rows = benchmark.variants(("float32", "mixed_float16"), tf32, strict)
        self.assertEqual([r[0] for r in rows], names)
        self.assertEqual([r[2] for r in rows], tf32_flags)
        self.assertEqual([r[1] for r in rows][-1], "mixed_float16")

    @parameterized.named_parameters(
        ("no_float32_first", dict(policies=("mixed_float16", "float32")),
         r"`policies` must list .*float32 first"),
        ("unknown_policy", dict(policies=("float32", "fp8")), r"`policies` must list"),
        ("unknown_model", dict(model="vgg"), r"Unknown `model`: 'vgg'. Expected one of: "
         r"resnet_mini.*transformer, mlp\.$"),
        ("batch_size", dict(batch_size=0), r"`batch_size` must be an integer >= 1.*=0"),
        ("hidden", dict(model="mlp", hidden=0), r"^`hidden` must be an integer >= 1.*=0$"),
        ("heads_do_not_divide", dict(model="transformer", hidden=32, num_heads=5),
         r"^`num_heads` must divide `hidden` \(32\). Received: num_heads=5$"),
        ("steps", dict(steps=0), r"`steps` must be an integer >= 1"),
        ("missing_file", dict(model_file="/nonexistent.keras"), r"`model_file` is not a file"),
        ("image_size_below_the_models_minimum", dict(model="resnet50", image_size=16),
         r"^`image_size` must be an integer >= 32 for model='resnet50'"),
    )
    def test_bad_arguments(self, kwargs, message):
        with self.assertRaisesRegex(ValueError, message) as raised:
            benchmark.benchmark(isolate=False, progress=False, **kwargs)
        self.assertIsInstance(raised.exception, tfmp.cli.UsageError)  # exit status 2

    @parameterized.named_parameters(
        ("policies", ["--policies=mixed_float16"], r"^error: `policies` must list"),
        ("model", ["--model=vgg"], r"^error: Unknown `model`: 'vgg'"),
        ("size", ["--model=transformer", "--seq_len=0"],
         r"^error: `seq_len` must be an integer >= 1. Received: seq_len=0$"),
        ("json_is_a_directory", ["--json={tmp}"],
         r"^error: `json` is a directory; pass a file path. Received: json='{tmp}'$"),
    )
    def test_cli_usage_error(self, flags, message):
        tmp = self.tmp_dir()
        # Under JAX when it is installed: the same checks, a quicker start than TensorFlow's.
        backend = "jax" if importlib.util.find_spec("jax") else "tensorflow"
        result = _run(*[f.format(tmp=tmp) for f in flags], backend=backend, timeout=120)
        self.assertEqual(result.returncode, 2, result.stderr[-3000:])
        self.assertNotIn("Traceback", result.stderr)
        errors = recipe_helpers.error_lines(result.stderr)
        self.assertLen([e for e in errors if e.startswith("error:")], 1, result.stderr)
        self.assertRegex([e for e in errors if e.startswith("error:")][0],
                         message.format(tmp=tmp))
        self.assertNotIn("ex/s", result.stdout + result.stderr)  # nothing was measured

    @unittest.skipIf(importlib.util.find_spec("jax") is None, "jax is not installed")
    def test_cli_jax_one_process_per_row_never_imports_tensorflow(self):
        tmp = self.tmp_dir()
        out, marker = os.path.join(tmp, "bench.json"), os.path.join(tmp, "tensorflow_imported")
        sizes = [f"--{k}={v}" for k, v in _TINY["transformer"].items()]
        result = _run("--model=transformer", *sizes, "--policies=float32,mixed_float16",
                      "--steps=1", "--repeats=2", "--warmup=1", "--nooptimizer_overhead",
                      "--noprogress", f"--json={out}",
                      backend="jax", tensorflow_marker=marker)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertFalse(os.path.exists(marker), "TensorFlow was imported under JAX")
        with open(out) as f:
            results = json.load(f)
        self.assertEqual((results["backend"], results["device"]), ("jax", "CPU"))
        self.assertEqual(results["float32_mode"], "float32 (no TF32 on a CPU)")
        self.assertEqual(list(results["policies"]), ["float32", "mixed_float16"])
        self.assertLess(results["policies"]["mixed_float16"]["activation_memory_ratio"], 0.75)
        for name, row in results["policies"].items():
            self.assertGreater(row["examples_per_second"], 0, name)
            self.assertGreater(row["peak_memory_mib"], 50, name)  # ru_maxrss: no GPU stats
            self.assertEqual(row["memory_kind"], "process_peak_rss")
        self.assertIsNone(results["optimizer_overhead"])
        self.assertIn("one process per row", result.stdout)
        self.assertRegex(result.stdout, r"\nmixed_float16 +\d")
