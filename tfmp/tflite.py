"""TFLite export with float16 weights and float32 inputs and outputs (TensorFlow only).

TensorFlow's converter refuses a model trained under `mixed_float16` as it is:
its float16 `MatMul` has no TFLite kernel (`'tf.MatMul' op is neither a custom op
nor a flex op`, for `TFLiteConverter.from_keras_model` and for the SavedModel of
Keras' `model.export()` alike; tensorflow/tensorflow#46380). `export_tflite`
converts a float32 copy of the model instead (`tfmp.apply_policy(model,
"float32")`: the same weights, every layer computing in float32), served through
`tfmp.export.export_saved_model`, with TensorFlow's own float16 weight
quantization (`Optimize.DEFAULT` with `supported_types=[tf.float16]`): weights are
stored in float16 (about half the bytes) and the interpreter takes and returns
float32. The file is written atomically (`tfmp._io`).

Example:

    path = tfmp.export_tflite(model, "/tmp/model.tflite")
    interpreter = tf.lite.Interpreter(model_path=path)
"""

from __future__ import annotations

import os
import tempfile

import keras

from tfmp import _io, _tf, convert, export

WEIGHTS_DTYPES = ("float16", "float32")


def validate_weights_dtype(weights_dtype: str) -> str:
    """Returns `weights_dtype` if it is one of `WEIGHTS_DTYPES`, else raises `ValueError`."""
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"Unknown `weights_dtype`: {weights_dtype!r}. Expected one of: "
                         f"{', '.join(WEIGHTS_DTYPES)}.")
    return weights_dtype


def tflite_bytes(model: keras.Model, *, weights_dtype: str = "float16") -> bytes:
    """The TFLite flatbuffer of `model`, float32 in and out.

    Args:
        model: A built functional or Sequential `keras.Model`, under any policy.
        weights_dtype: `"float16"` (float16 weights) or `"float32"`.

    Returns:
        The flatbuffer's bytes.
    """
    tf = _tf.import_tensorflow("tfmp.tflite")
    validate_weights_dtype(weights_dtype)
    float32 = convert.apply_policy(model, "float32")
    with tempfile.TemporaryDirectory(prefix="tfmp-tflite-") as tmp:
        saved = export.export_saved_model(float32, os.path.join(tmp, "saved_model"))
        converter = tf.lite.TFLiteConverter.from_saved_model(saved)
        if weights_dtype == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        return converter.convert()


def export_tflite(model: keras.Model, path: str | os.PathLike, *,
                  weights_dtype: str = "float16") -> str:
    """Writes `model` as a TFLite file with `weights_dtype` weights, float32 in and out.

    Args:
        model: A built functional or Sequential `keras.Model`, under any policy.
        path: The `.tflite` file to write (its directory must exist); a previous
            file is replaced only once the new one is complete.
        weights_dtype: `"float16"` (default) or `"float32"`.

    Returns:
        The absolute path written.

    Raises:
        ValueError: for an unknown `weights_dtype` or a `path` that is a directory.
    """
    validate_weights_dtype(weights_dtype)
    if os.path.isdir(path):
        raise ValueError(f"`path` is a directory; pass a file path. Received: path={path!r}")
    return _io.write_bytes_atomically(path, tflite_bytes(model, weights_dtype=weights_dtype))
