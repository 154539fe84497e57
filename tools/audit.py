"""Audits a model's precision in float16: per-layer ranges, gradient underflow, loss scale.

python -m tools.audit --model=model.keras --data=batch.npz [--out_dir=DIR]
python -m tools.audit --recipe_model=resnet_mini [--batch_size=8] [--out_dir=DIR]

`--data` is an `.npz` file with an array `x` (one batch for a single-input
model) and optionally `y` (targets: then gradients are audited too, with the
model's compiled loss or `--loss`). `--recipe_model` builds a `tfmp.models`
image classifier at initialisation and audits it on synthetic 32x32 images.
Writes `report.json` (see `tfmp.audit.AuditReport.to_dict`) and `audit.png`
(per-layer activation range against float16's limits, and the gradient
histogram) into `--out_dir` (default: the current directory), and prints the
table. Both files are written atomically (a hidden temporary renamed into
place), so a failed run keeps the previous ones. NaN or inf values in the data
are reported (`nonfinite_inputs` and a line of the table), not an error. The
model is loaded with `safe_mode=True` and the data with `allow_pickle=False`.
An `--out_dir` that cannot take the files (a file, a `report.json` or
`audit.png` that is a directory, a directory that cannot be written) is
refused before any work: one `error:` line on stderr and exit status 2, as are
a bad flag, model file or data (`tfmp.cli`'s convention; TensorFlow's C++
start-up lines may also reach stderr).
"""

import os
import zipfile
from collections.abc import Callable
from typing import Any

import tfmp
from tfmp import _io

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Defined only when the tool runs as a program (`__main__` below), not on import: tests
# import this module beside the recipes, whose --model and --batch_size have other defaults,
# --loss_scale another type (str) and --policy another help text.
_FLAG_TABLE = {
    "model": (str, None, "Path of a `.keras` model file."),
    "data": (str, None, "Path of an `.npz` file with `x` and optional `y`."),
    "recipe_model": (str, None, "Instead of --model/--data: a tfmp.models image classifier "
                     "(resnet_mini, mobilenet_v2, resnet50, efficientnet_b0) on synthetic "
                     "images."),
    "batch_size": (int, 8, "Synthetic batch size for --recipe_model."),
    "policy": (str, "mixed_float16", "mixed_float16, mixed_bfloat16, or 'model' for the "
               "model's own per-layer policies (e.g. a model converted with "
               "tfmp.convert.apply_policy)."),
    "loss": (str, None, "Keras loss name (default: the compiled loss)."),
    "loss_scale": (float, None, "Loss scale for the scaled underflow share (default: "
                   "recommended)."),
    "out_dir": (str, ".", "Where to write report.json and audit.png."),
}

_POLICIES = ("mixed_float16", "mixed_bfloat16", "model")
_OUTPUTS = ("report.json", "audit.png")


def check_out_dir(out_dir: str) -> str:
    """Refuses an `out_dir` that cannot take `report.json` and `audit.png`, before any work.

    Args:
        out_dir: The output directory (created later if missing).

    Returns:
        `out_dir`.

    Raises:
        ValueError: if `out_dir` or one of its existing parents is not a
            directory, an output file's path is a directory, or the nearest
            existing directory cannot be written (tried with a file created and
            removed at once).
    """
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"`out_dir` exists and is not a directory. Received: out_dir={out_dir!r}")
    for name in _OUTPUTS:
        path = os.path.join(out_dir, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            raise ValueError(
                f"`out_dir` holds a {name} that is not a file ({path!r}); refusing to replace "
                f"it. Received: out_dir={out_dir!r}")
    existing = os.path.abspath(out_dir)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(
            f"`out_dir` is inside {existing!r}, which is not a directory. Received: "
            f"out_dir={out_dir!r}")
    probe = _io.temp_path(os.path.join(existing, "probe"))
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.remove(probe)
    except OSError as e:
        raise ValueError(
            f"`out_dir` cannot be written: {existing!r} refuses new files ({e.strerror}). "
            f"Received: out_dir={out_dir!r}") from None
    return out_dir


def _load_batch(path: str) -> tuple[Any, Any]:
    import numpy as np

    if not os.path.isfile(path):
        raise ValueError(f"`data` is not a file. Received: data={path!r}")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"could not read `data` as .npz ({e}). Received: data={path!r}") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"`data` must be an .npz archive, not .npy. Received: data={path!r}")
    with npz:
        if "x" not in npz.files:
            raise ValueError(
                f"`data` has no array 'x' (it has: {npz.files}). Save the batch with "
                f"np.savez(path, x=x, y=y). Received: data={path!r}")
        try:
            return npz["x"], (npz["y"] if "y" in npz.files else None)
        except ValueError as e:  # An object array: refused without pickle.
            raise ValueError(f"could not read `data` ({e}). Received: data={path!r}") from e


def audit(*, model_path: str | None = None, data_path: str | None = None,
          recipe_model: str | None = None, batch_size: int = 8, policy: str = "mixed_float16",
          loss: str | None = None, loss_scale: float | None = None, out_dir: str = ".",
          print_fn: Callable[[str], Any] = print) -> dict:
    """Audits a saved model on a saved batch (or a recipe model on synthetic data).

    Args:
        model_path: A `.keras` file (with `data_path`).
        data_path: An `.npz` file with `x` and optional `y`.
        recipe_model: A `tfmp.models.IMAGE_MODELS` name, instead of the files.
        batch_size: Synthetic examples for `recipe_model`.
        policy: `"mixed_float16"`, `"mixed_bfloat16"` or `"model"` (own policies).
        loss: A Keras loss name; defaults to the compiled loss (sparse
            categorical cross-entropy for `recipe_model`).
        loss_scale: The scale for the scaled gradient underflow share.
        out_dir: Directory for `report.json` and `audit.png` (created if missing;
            checked first, see `check_out_dir`).
        print_fn: Called with the table.

    Returns:
        The report as a dict (`report.json`'s content).

    Example:

        audit(recipe_model="resnet_mini", batch_size=4, out_dir="/tmp/audit")
    """
    check_out_dir(out_dir)
    if (model_path is None) == (recipe_model is None):
        raise ValueError(
            "give either --model (with --data) or --recipe_model. Received: "
            f"model={model_path!r}, recipe_model={recipe_model!r}")
    if model_path is not None:
        tfmp.cli.check_keras_file(model_path, argument="model")
        if data_path is None:
            raise ValueError("--model needs --data=batch.npz (arrays `x` and optional `y`).")
        x, y = _load_batch(data_path)
    elif data_path is not None:
        raise ValueError("--data goes with --model; --recipe_model makes synthetic data.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1. Received: batch_size={batch_size}")
    if policy not in _POLICIES:
        raise ValueError(
            f"Unknown `policy`: {policy!r}. Expected one of: {', '.join(_POLICIES)}.")
    if recipe_model is not None:
        tfmp.models.validate_image_model(recipe_model)
        model = tfmp.models.image_classifier(recipe_model, (32, 32, 3), 10)
        x, y = tfmp.data.synthetic_images(batch_size, 32, 10, seed=0)
        loss = loss or "sparse_categorical_crossentropy"
    else:
        model = tfmp.cli.load_keras_file(model_path, argument="model", compile=True)
    report = tfmp.audit.audit_model(
        model, x, y, loss=loss, policy=None if policy == "model" else policy,
        loss_scale=loss_scale)
    result = report.to_dict()
    report_path, plot_path = (os.path.join(out_dir, name) for name in _OUTPUTS)
    _io.write_json_atomically(report_path, result)
    report.plot(plot_path)
    print_fn(report.table())
    print_fn(f"Wrote {report_path} and {plot_path}.")
    return result


def main(argv):
    tfmp.cli.check_no_arguments(argv)
    # Exit 2 for what is wrong with the arguments, the model file or the data
    # (tfmp.cli's convention); the output directory is checked before any work.
    values = tfmp.cli.flag_values(_FLAGS)
    with tfmp.cli.usage_errors():
        check_out_dir(values["out_dir"])
        audit(model_path=values["model"], data_path=values["data"],
              recipe_model=values["recipe_model"], batch_size=values["batch_size"],
              policy=values["policy"], loss=values["loss"], loss_scale=values["loss_scale"],
              out_dir=values["out_dir"])


if __name__ == "__main__":
    _FLAGS = tfmp.cli.define_flags(_FLAG_TABLE)  # as a program only: see _FLAG_TABLE
    tfmp.cli.run(main)
