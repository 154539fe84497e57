"""Exports a `.keras` model as a SavedModel that serves float32 (TensorFlow only).

python -m tools.export_savedmodel --model=model.keras --export_dir=/tmp/serving/1 \\
    [--serving_dtype=float32] [--weights_dtype=float16]

The model is loaded with `safe_mode=True` (no Lambda code, no pickles) and without
its optimizer. An `--export_dir` that `tfmp.export.check_export_dir` refuses (a
directory with files that are not a SavedModel's) is refused before the model is
loaded. The SavedModel is written atomically (see `tfmp.export`). Errors follow
`tfmp.cli`: one `error:` line on stderr, exit status 2 for a bad flag, a model
file that is missing, not a `.keras` archive or refused in safe mode, or a
refused `--export_dir`, and 1 for a failure during the export.
(TensorFlow's C++ start-up lines, `I0000 ... port.cc ...` and the like, may also
reach stderr: TF 2.21 prints some of them whatever `TF_CPP_MIN_LOG_LEVEL` says.)
"""


from absl import flags, logging

import tfmp

# Defined only when the tool runs as a program (`__main__` below), not on import: the
# recipes' --model has another default ("resnet_mini": --model would no longer be required)
# and their --export_dir another help text.
_FLAG_TABLE = {
    "model": (str, None, "Path of the `.keras` model file to export."),
    "export_dir": (str, None, "SavedModel directory to write."),
    "serving_dtype": (str, "float32", "Dtype of the served inputs and outputs: float32, "
                      "float16 or bfloat16."),
    "weights_dtype": (str, "float32", "Dtype of the stored trainable weights: float32 or "
                      "float16 (about half the size)."),
}


def _format(tensors: dict) -> str:
    return ", ".join(
        f"{name}: {dtype}{list(shape) if shape is not None else '[?]'}"
        for name, (dtype, shape) in tensors.items()
    )


def export_savedmodel(model_path: str, export_dir: str, serving_dtype: str = "float32",
                      weights_dtype: str = "float32") -> str:
    """Loads `model_path` safely, exports it, and describes the serving signature.

    Args:
        model_path: Path of a `.keras` file.
        export_dir: SavedModel directory to write (replaced atomically if it holds
            a previous SavedModel and nothing else).
        serving_dtype: One of `"float32"`, `"float16"`, `"bfloat16"`.
        weights_dtype: `"float32"` or `"float16"` (see `tfmp.export.export_saved_model`).

    Returns:
        A few lines: where the SavedModel is, its signature inputs and outputs.

    Example:

        print(export_savedmodel("model.keras", "/tmp/serving/1"))
    """
    _check(serving_dtype, weights_dtype, export_dir)  # Refused before the model is loaded.
    return _export(tfmp.cli.load_keras_file(model_path, argument="--model"), export_dir,
                   serving_dtype, weights_dtype)


def _check(serving_dtype: str, weights_dtype: str, export_dir: str) -> None:
    tfmp.export.validate_serving_dtype(serving_dtype)
    tfmp.export.validate_weights_dtype(weights_dtype)
    tfmp.export.check_export_dir(export_dir)


def _export(model, export_dir: str, serving_dtype: str, weights_dtype: str) -> str:
    path = tfmp.export.export_saved_model(model, export_dir, serving_dtype=serving_dtype,
                                          weights_dtype=weights_dtype)
    sig = tfmp.export.serving_signature(path)
    return (
        f"SavedModel written to {path}\n"
        f"serving_default inputs: {_format(sig['inputs'])}\n"
        f"serving_default outputs: {_format(sig['outputs'])}"
    )


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TensorFlow's INFO lines about saving.
    values = tfmp.cli.flag_values(_FLAGS)
    if not values["model"]:
        raise tfmp.cli.UsageError("`--model` is required: the path of a `.keras` file.")
    if not values["export_dir"]:
        raise tfmp.cli.UsageError(
            "`--export_dir` is required: the SavedModel directory to write.")
    with tfmp.cli.usage_errors():  # the export_dir first, then the model file
        _check(values["serving_dtype"], values["weights_dtype"], values["export_dir"])
        model = tfmp.cli.load_keras_file(values["model"], argument="--model")
    print(_export(model, values["export_dir"], values["serving_dtype"], values["weights_dtype"]))


if __name__ == "__main__":
    _FLAGS = tfmp.cli.define_flags(_FLAG_TABLE)  # as a program only: see _FLAG_TABLE
    tfmp.cli.run(main)
