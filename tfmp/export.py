"""SavedModel export whose serving signature speaks float32 (TensorFlow only).

This module is TensorFlow-specific: it writes a TensorFlow SavedModel and needs
the TensorFlow Keras backend.

A model trained under `mixed_float16` usually ends in a float16 layer, and
Keras' own `model.export()` then serves float16 outputs. `export_saved_model`
wraps the model in a serving function that takes `serving_dtype` (float32 by
default) inputs, casts them to the model's input dtypes, runs the model with
`training=False`, and casts every floating output back to `serving_dtype`.
Integer inputs and outputs (token ids, class indices) keep their dtype.

The SavedModel has one endpoint, `serve` (as `model.export()` writes), also
registered as the `serving_default` signature, so it loads with
`tf.saved_model.load` alone, with TF Serving, and with
`keras.layers.TFSMLayer`. Outputs are returned as a dict keyed by output name
when the model has several outputs (a list keeps the model's output names,
a dict its keys); a single output is returned as a tensor, which the
signature names `output_0`, as `model.export()` does.

Writes are atomic and durable on a local file system (`tfmp._io.atomic_path`):
the SavedModel is written into a hidden directory `.tmp-<host>-<pid>-<random>-<name>`
next to `export_dir`, fsynced and renamed into place, so `export_dir` never
holds a half-written SavedModel; a previous export there is moved aside and
deleted only once the new one is in place, and if the export fails it stays
where it was. A temporary directory left by a killed export is removed by the
next export to the same `export_dir`, once its process is dead (a process of
this host whose pid is gone: a live export's directory is never touched).
Only a directory holding nothing but a SavedModel's own entries
(`saved_model.pb`, `fingerprint.pb`, `variables/`, `assets/`) is replaced; one
with anything else in it (a user's file, `assets.extra/`) is refused.
Remote paths (`gs://`, ...) are not supported.

Example:

    tfmp.set_global_policy("mixed_float16")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = tfmp.export.export_saved_model(model, "/tmp/serving/1")
    reloaded = tf.saved_model.load(path)   # keep a reference while calling it
    reloaded.signatures["serving_default"](tf.ones((1, 4)))["output_0"].dtype  # float32
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence

import keras

from tfmp import _io, _tf
from tfmp.serving import SIGNATURE, load_serving_layer, serving_signature  # noqa: F401

SERVING_DTYPES = ("float32", "float16", "bfloat16")
ENDPOINT = "serve"
_SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
# What a SavedModel directory holds: files, directories, and what `variables/` holds.
_SAVED_MODEL_ENTRIES = {"saved_model.pb": False, "saved_model.pbtxt": False,
                        "fingerprint.pb": False, "keras_metadata.pb": False,
                        "variables": True, "assets": True}
_VARIABLES_FILE = re.compile(r"^variables\.(index|data-\d{5}-of-\d{5})$")


def _tensorflow():
    if keras.backend.backend() != "tensorflow":
        raise NotImplementedError(
            "tfmp.export needs the TensorFlow Keras backend. "
            f"Current backend: {keras.backend.backend()!r}; set KERAS_BACKEND=tensorflow."
        )
    return _tf.import_tensorflow("tfmp.export")


def validate_serving_dtype(serving_dtype: str) -> str:
    """Returns `serving_dtype` if it is allowed, else raises `ValueError`.

    Args:
        serving_dtype: One of `"float32"`, `"float16"`, `"bfloat16"`.

    Returns:
        `serving_dtype`, unchanged.

    Example:

        >>> validate_serving_dtype("float32")
        'float32'
    """
    if not isinstance(serving_dtype, str) or serving_dtype not in SERVING_DTYPES:
        raise ValueError(
            f"`serving_dtype` must be one of: {', '.join(SERVING_DTYPES)}. "
            f"Received: serving_dtype={serving_dtype!r}"
        )
    return serving_dtype


def _input_structure(model: keras.Model):
    """The structure of `KerasTensor`s the model is called on (functional or Sequential)."""
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`model` must be a `keras.Model`. Received: model={model!r} "
            f"of type {type(model).__name__}"
        )
    if isinstance(model, keras.Sequential):
        try:
            inputs = model.inputs
        except AttributeError:
            inputs = None
        if not inputs:
            raise ValueError(
                f"`model` has no defined inputs. Received: model={model.name!r}, a Sequential "
                "model that was never built; start it with `keras.Input(shape)`."
            )
        return inputs[0]
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError(
            f"`model` has no defined inputs. Received: model={model.name!r} of type "
            f"{type(model).__name__}; export a functional or Sequential model built "
            "from `keras.Input`."
        )
    return model.input


def _is_float(dtype) -> bool:
    return "float" in keras.backend.standardize_dtype(dtype)


def _input_signature(structure, serving_dtype: str):
    """`tf.TensorSpec`s mirroring `structure`: batch dim None, floats as `serving_dtype`."""
    tf = _tensorflow()

    def spec(x, name):
        dtype = keras.backend.standardize_dtype(x.dtype)
        shape = (None,) + tuple(x.shape)[1:]
        return tf.TensorSpec(shape, serving_dtype if _is_float(dtype) else dtype, name=name)

    if isinstance(structure, Mapping):
        return {key: spec(x, key) for key, x in structure.items()}
    if isinstance(structure, Sequence):
        return [spec(x, x.name) for x in structure]
    return spec(structure, structure.name)


def _output_names(model: keras.Model, count: int) -> list[str]:
    names = list(getattr(model, "output_names", None) or [])
    if len(names) == count and len(set(names)) == count:
        return names
    return [f"output_{i}" for i in range(count)]


def _serving_fn(model: keras.Model, structure, serving_dtype: str,
                call: Callable | None = None) -> Callable:
    """The function the SavedModel serves: cast in, call, cast out, name outputs.

    `call(inputs)` runs the model (default: `model(inputs, training=False)`).
    """
    tf = _tensorflow()
    call = call or (lambda inputs: model(inputs, training=False))
    model_dtypes = tf.nest.map_structure(lambda x: keras.backend.standardize_dtype(x.dtype),
                                         structure)

    def cast_out(y):
        return tf.cast(y, serving_dtype) if y.dtype.is_floating else y

    def serve(inputs):
        inputs = tf.nest.map_structure(lambda x, dt: tf.cast(x, dt), inputs, model_dtypes)
        outputs = call(inputs)
        if isinstance(outputs, Mapping):
            return {key: cast_out(y) for key, y in outputs.items()}
        flat = tf.nest.flatten(outputs)
        if len(flat) == 1:
            return cast_out(flat[0])
        return dict(zip(_output_names(model, len(flat)), map(cast_out, flat), strict=True))

    return serve


WEIGHTS_DTYPES = ("float32", "float16")


class _StoredWeights:
    """The model's variables as the export stores them: trainable floats as `weights_dtype`.

    The serving function calls `model.stateless_call` with these values cast back to
    each variable's own dtype, so the SavedModel holds only these `tf.Variable`s
    (float16 kernels: half the bytes) and the model computes as it was trained.
    Non-trainable state (batch-norm statistics, counters) keeps its dtype.
    """

    def __init__(self, model: keras.Model, weights_dtype: str):
        tf = _tensorflow()
        self.model = model

        def stored(v, cast: bool):
            value = v.value
            if cast and _is_float(v.dtype):
                value = tf.cast(value, weights_dtype)
            return tf.Variable(value, trainable=False, name=v.path.replace("/", "_"))

        self.trainable = [stored(v, True) for v in model.trainable_variables]
        self.non_trainable = [stored(v, False) for v in model.non_trainable_variables]

    def call(self, inputs):
        tf = _tensorflow()
        trainable = [tf.cast(s, v.dtype) for s, v in
                     zip(self.trainable, self.model.trainable_variables, strict=True)]
        outputs, _ = self.model.stateless_call(trainable, list(self.non_trainable), inputs,
                                               training=False)
        return outputs


def validate_weights_dtype(weights_dtype: str) -> str:
    """Returns `weights_dtype` if it is one of `WEIGHTS_DTYPES`, else raises `ValueError`."""
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"Unknown `weights_dtype`: {weights_dtype!r}. Expected one of: "
                         f"{', '.join(WEIGHTS_DTYPES)}.")
    return weights_dtype


def check_export_dir(export_dir: str | os.PathLike) -> str:
    """Checks that `export_dir` can be written (before any training), and returns it absolute.

    Args:
        export_dir: The SavedModel directory to write later.

    Returns:
        `export_dir` as an absolute path.

    Raises:
        ValueError: for a remote path (`gs://...`: the atomic rename needs a local
            file system), or an existing path that is neither empty nor a
            SavedModel with nothing else in it (the message lists the other entries).
    """
    path = os.fspath(export_dir)
    if "://" in path:
        raise ValueError(
            "`export_dir` must be a local path (the SavedModel is renamed into place "
            f"atomically); copy it to remote storage afterwards. Received: export_dir={path!r}")
    path = os.path.abspath(path)
    _check_replaceable(path)
    return path


def _check_replaceable(export_dir: str) -> None:
    """Refuses to replace anything but an empty directory or a SavedModel and nothing else."""
    if not os.path.lexists(export_dir):
        return
    if not os.path.isdir(export_dir) or os.path.islink(export_dir):
        raise ValueError(
            "`export_dir` exists and is not a directory (or is a symbolic link). Received: "
            f"export_dir={export_dir!r}; pass a new path or a previous SavedModel directory."
        )
    entries = sorted(os.listdir(export_dir))
    if entries and not any(name in entries for name in _SAVED_MODEL_FILES):
        raise ValueError(
            f"`export_dir` is a non-empty directory that holds no SavedModel; refusing to "
            f"replace it. Received: export_dir={export_dir!r}; pass a new path, an empty "
            "directory or a previous SavedModel directory."
        )
    unexpected = []
    for name in entries:
        path = os.path.join(export_dir, name)
        is_dir = os.path.isdir(path) and not os.path.islink(path)
        if name not in _SAVED_MODEL_ENTRIES or _SAVED_MODEL_ENTRIES[name] != is_dir or (
                not is_dir and not os.path.isfile(path)):
            unexpected.append(name)
        elif name == "variables":
            unexpected += [f"variables/{v}" for v in sorted(os.listdir(path))
                           if not _VARIABLES_FILE.match(v)
                           or not os.path.isfile(os.path.join(path, v))]
    if unexpected:
        raise ValueError(
            f"`export_dir` holds a SavedModel and entries that are not part of one: "
            f"{unexpected}; refusing to replace it (that would delete them). Received: "
            f"export_dir={export_dir!r}; move them away or pass another path."
        )


def export_saved_model(
    model: keras.Model,
    export_dir: str | os.PathLike,
    *,
    serving_dtype: str = "float32",
    weights_dtype: str = "float32",
) -> str:
    """Writes `model` as a SavedModel that serves `serving_dtype` in and out.

    The `serve` endpoint and the `serving_default` signature take one tensor per
    model input (floating inputs as `serving_dtype`, batch dimension `None`),
    cast them to the model's input dtypes, call the model with `training=False`
    and cast every floating output to `serving_dtype`. Optimizer state is not
    exported.

    Args:
        model: A built functional or Sequential `keras.Model` (any dtype policy).
        export_dir: Local directory to write. If it exists it must be empty or hold
            a previous SavedModel and nothing else, which is replaced only once
            the new one is complete.
        serving_dtype: Dtype of the signature's floating inputs and outputs: one of
            `"float32"`, `"float16"`, `"bfloat16"`.
        weights_dtype: `"float32"` (the model's variables as they are) or
            `"float16"`: the trainable floating variables are stored in float16
            (about half the size) and cast back to their own dtype when served, so
            each layer computes in its trained dtype from float16-rounded weights.
            Non-trainable state (batch-norm statistics) is stored as it is.

    Returns:
        The absolute path of the written SavedModel.

    Example:

        path = tfmp.export.export_saved_model(model, "/tmp/serving/1")
        reloaded = tf.saved_model.load(path)
        out = reloaded.serve(tf.ones((2, 4)))   # float32
    """
    validate_serving_dtype(serving_dtype)
    validate_weights_dtype(weights_dtype)
    structure = _input_structure(model)
    export_dir = check_export_dir(export_dir)

    archive = keras.export.ExportArchive()
    if weights_dtype == "float32":
        archive.track(model)
        call = None
    else:
        stored = _StoredWeights(model, weights_dtype)
        holder = _tensorflow().Module()  # the stored variables are saved, not the model's
        holder.stored = stored.trainable + stored.non_trainable
        archive.track(holder)
        call = stored.call
    serve = archive.add_endpoint(
        ENDPOINT,
        _serving_fn(model, structure, serving_dtype, call),
        input_signature=[_input_signature(structure, serving_dtype)],
    )
    # The same traced function under the signature's name, so that it is also an
    # attribute: `TFSMLayer(call_endpoint="serving_default")` then calls it with the
    # input structure (a signature function takes keyword arguments only).
    archive.add_endpoint(SIGNATURE, serve)
    with _io.atomic_path(export_dir) as tmp_dir:
        archive.write_out(tmp_dir, verbose=False)
    return export_dir
