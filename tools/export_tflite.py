"""Exports a `.keras` model as a TFLite file with float16 weights, float32 in and out.

python -m tools.export_tflite --model=model.keras --output=/tmp/model.tflite \\
    [--weights_dtype=float16]

The model is loaded with `safe_mode=True` (no Lambda code, no pickles) and without
its optimizer, converted through a float32 copy (`tfmp.tflite`: a model trained
under mixed_float16 converts), and written atomically. Errors follow `tfmp.cli`:
one `error:` line, exit status 2 for a bad flag, a missing or refused model file or
an `--output` that cannot be written (checked before the model is loaded), 1 for
a failure during the conversion.
"""

import os

import tfmp

# Defined only when the tool runs as a program: the recipes' --model has another default.
_FLAG_TABLE = {
    "model": (str, None, "Path of the `.keras` model file to convert."),
    "output": (str, None, "The `.tflite` file to write."),
    "weights_dtype": (str, "float16", "Dtype of the stored weights: float16 or float32."),
}


def export_tflite(model_path: str, output: str, weights_dtype: str = "float16") -> str:
    """Loads `model_path` safely, converts it, and says what was written.

    Args:
        model_path: Path of a `.keras` file.
        output: The `.tflite` file to write.
        weights_dtype: `"float16"` or `"float32"`.

    Returns:
        One line: the file written and its size.

    Example:

        print(export_tflite("model.keras", "/tmp/model.tflite"))
    """
    with tfmp.cli.usage_errors():  # the arguments first, then the model file
        tfmp.tflite.validate_weights_dtype(weights_dtype)
        tfmp.cli.check_output_file(output, argument="output")
        model = tfmp.cli.load_keras_file(model_path, argument="model")
    path = tfmp.tflite.export_tflite(model, output, weights_dtype=weights_dtype)
    return (f"TFLite model written to {path} ({os.path.getsize(path)} bytes, "
            f"{weights_dtype} weights, float32 inputs and outputs)")


def main(argv):
    tfmp.cli.check_no_arguments(argv)
    values = tfmp.cli.flag_values(_FLAGS)
    for name, what in (("model", "the path of a `.keras` file"),
                       ("output", "the `.tflite` file to write")):
        if not values[name]:
            raise tfmp.cli.UsageError(f"`--{name}` is required: {what}.")
    print(export_tflite(values["model"], values["output"], values["weights_dtype"]))


if __name__ == "__main__":
    _FLAGS = tfmp.cli.define_flags(_FLAG_TABLE)  # as a program only: see _FLAG_TABLE
    tfmp.cli.run(main)
