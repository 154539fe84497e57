"""Tests for tools/inspect_policy.py: the function and the command line."""

import json
import os
import subprocess
import sys
import tempfile

import keras

import tfmp
from tests import recipe_helpers
from tests.base import TestCase
from tfmp import convert
from tools import inspect_policy

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save_tiny_model(directory):
    model = keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(8, name="hidden"),
        keras.layers.LayerNormalization(name="ln"), keras.layers.Dense(3, name="out"),
    ], name="tiny")
    path = os.path.join(directory, "tiny.keras")
    convert.apply_policy(model, "mixed_float16").save(path)
    return path


def _run_tool(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", "tools.inspect_policy", *args],
        cwd=_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )


class InspectPolicyTest(TestCase):

    def setUp(self):
        super().setUp()
        self.dir = tempfile.mkdtemp()

    def test_table(self):
        path = _save_tiny_model(self.dir)
        lines = []
        rows = inspect_policy.inspect_policy(path, print_fn=lines.append)
        self.assertEqual(
            [(r["name"], r["policy"], r["output_dtype"]) for r in rows],
            [("hidden", "mixed_float16", "float16"), ("ln", "float32", "float32"),
             ("out", "float32", "float32")])
        self.assertEqual(rows[-1]["not_multiple_of_8"], ["units"])
        self.assertEqual(lines[0], 'Model: "tiny"')
        self.assertRegex(
            lines[-2], r"^out\s+Dense\s+float32\s+float32\s+float32\s+float32\s+units=3$")

    def test_json(self):
        path = _save_tiny_model(self.dir)
        printed = []
        rows = inspect_policy.inspect_policy(path, as_json=True, print_fn=printed.append)
        self.assertLen(printed, 1)
        self.assertEqual(json.loads(printed[0]), rows)

    def test_bad_files(self):
        with self.assertRaisesRegex(
                ValueError, r"`path` is not a file. Received: path='/no/m.keras'"):
            inspect_policy.inspect_policy("/no/m.keras")
        text = os.path.join(self.dir, "text.keras")
        with open(text, "w") as f:
            f.write("not a model")
        with self.assertRaisesRegex(ValueError, r"`path` is not a `.keras` zip archive"):
            inspect_policy.inspect_policy(text)

    def test_lambda_layer_is_refused_in_safe_mode(self):
        model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda x: x * 2)])
        path = os.path.join(self.dir, "lambda.keras")
        model.save(path)
        with self.assertRaisesRegex(ValueError, r"could not load `path` .* in safe mode.*Lambda"):
            inspect_policy.inspect_policy(path)

    def test_cli_json(self):
        path = _save_tiny_model(self.dir)
        result = _run_tool(path, "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        rows = json.loads(result.stdout)
        self.assertEqual([r["policy"] for r in rows], ["mixed_float16", "float32", "float32"])
        self.assertEqual(rows, tfmp.convert.summary(
            keras.saving.load_model(path, compile=False), print_fn=lambda line: None))

    def test_cli_missing_file(self):
        result = _run_tool("/nonexistent.keras")
        self.assertEqual(result.returncode, 2)  # a bad argument: a usage error
        self.assertEqual(result.stdout, "")
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(
            recipe_helpers.error_lines(result.stderr),  # TensorFlow's start-up lines aside
            ["error: `path` is not a file. Received: path='/nonexistent.keras'"])

    def test_cli_needs_one_path(self):
        result = _run_tool()
        self.assertEqual(result.returncode, 2)
        lines = recipe_helpers.error_lines(result.stderr)
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertRegex(lines[0], r"^error: expected exactly one model path")
