"""Tests for tfmp/tflite.py and tools/export_tflite.py: float16 weights, float32 in and out."""

import os
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tfmp
from tests import recipe_helpers
from tests.base import TestCase
from tfmp import tflite


def _mixed_model():
    with tfmp.policy_scope("mixed_float16"):
        return keras.Sequential([
            keras.Input((64,)), keras.layers.Dense(256, activation="relu"),
            keras.layers.BatchNormalization(), keras.layers.LayerNormalization(),
            tfmp.layers.OutputHead(3)])


def _interpret(path: str, x: np.ndarray) -> tuple[np.ndarray, dict, dict]:
    """Runs the TFLite file at `path` on `x` in TensorFlow's TFLite interpreter."""
    interpreter = tf.lite.Interpreter(model_path=path)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(out["index"]), inp, out


def _float32_reference(model, x) -> np.ndarray:
    """What the float32 SavedModel export serves for `x`."""
    return keras.ops.convert_to_numpy(tfmp.apply_policy(model, "float32")(x, training=False))


class TFLiteTest(TestCase):
    def test_stock_conversion_of_a_mixed_model_fails(self):
        # tensorflow/tensorflow#46380: TFLite has no float16 MatMul kernel.
        converter = tf.lite.TFLiteConverter.from_keras_model(_mixed_model())
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
        with self.assertRaisesRegex(Exception, r"'tf.MatMul' op is neither a custom op nor a "
                                    r"flex op"):
            converter.convert()

    def test_mixed_model_converts_with_float16_weights(self):
        model = _mixed_model()
        x = np.random.default_rng(0).normal(size=(5, 64)).astype("float32")
        directory = self.tmp_dir()
        half = tflite.export_tflite(model, os.path.join(directory, "m16.tflite"))
        full = tflite.export_tflite(model, os.path.join(directory, "m32.tflite"),
                                    weights_dtype="float32")
        self.assertLess(os.path.getsize(half), 0.6 * os.path.getsize(full))
        y, inp, out = _interpret(half, x)
        self.assertEqual((inp["dtype"], out["dtype"]), (np.float32, np.float32))
        np.testing.assert_allclose(y, _float32_reference(model, x), atol=2e-3)
        np.testing.assert_allclose(y.sum(axis=1), np.ones(5), rtol=1e-5)

    @parameterized.named_parameters(("text", "text"))  # resnet_mini converts too (README)
    def test_recipe_models_convert(self, kind):
        rng = np.random.default_rng(0)
        with tfmp.policy_scope("mixed_float16"):
            if kind == "text":
                model = tfmp.models.text_classifier(16, 100, 2, embed_dim=16, num_heads=2,
                                                    num_layers=1)
                x = rng.integers(0, 100, (3, 16)).astype("int32")
            else:
                model = tfmp.models.image_classifier("resnet_mini", (16, 16, 3), 10)
                x = rng.random((3, 16, 16, 3)).astype("float32")
        path = tflite.export_tflite(model, os.path.join(self.tmp_dir(), "m.tflite"))
        y, inp, out = _interpret(path, x)
        self.assertEqual((inp["dtype"], out["dtype"]), (x.dtype, np.float32))
        np.testing.assert_allclose(y, _float32_reference(model, x), atol=2e-3)

    def test_failed_conversion_keeps_the_previous_file(self):
        path = os.path.join(self.tmp_dir(), "m.tflite")
        with open(path, "wb") as f:
            f.write(b"previous")
        with mock.patch.object(tflite, "tflite_bytes", side_effect=RuntimeError("boom")), \
                self.assertRaisesRegex(RuntimeError, "boom"):
            tflite.export_tflite(_mixed_model(), path)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"previous")
        self.assertEqual(os.listdir(os.path.dirname(path)), ["m.tflite"])  # no temporary

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, r"^Unknown `weights_dtype`: 'int8'. Expected "
                                    r"one of: float16, float32.$"):
            tflite.export_tflite(_mixed_model(), "m.tflite", weights_dtype="int8")
        directory = self.tmp_dir()
        with self.assertRaisesRegex(ValueError, r"^`path` is a directory; pass a file path"):
            tflite.export_tflite(_mixed_model(), directory)

    def test_cli_converts_a_keras_file(self):
        directory = self.tmp_dir()
        model_file = os.path.join(directory, "model.keras")
        _mixed_model().save(model_file)
        output = os.path.join(directory, "model.tflite")
        proc = recipe_helpers.run_cli("tools.export_tflite", f"--model={model_file}",
                                      f"--output={output}")
        self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
        self.assertRegex(proc.stdout, rf"^TFLite model written to {output} \(\d+ bytes, "
                         r"float16 weights, float32 inputs and outputs\)")
        self.assertTrue(os.path.isfile(output))
        bad = recipe_helpers.run_cli("tools.export_tflite", f"--model={model_file}",
                                     f"--output={directory}")
        self.assertEqual(bad.returncode, 2, bad.stderr)
        self.assertEqual(bad.stderr.splitlines(), [
            f"error: `output` is a directory; pass a file path. Received: output={directory!r}"])
