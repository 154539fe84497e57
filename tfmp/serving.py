"""Reading a SavedModel's serving signature, and loading it as a Keras layer (TensorFlow only).

`serving_signature(export_dir)` reads the inputs and outputs of a signature from
`saved_model.pb` without loading the model; `load_serving_layer(export_dir)`
loads it as a `keras.layers.TFSMLayer` that works under any global policy. Both
are re-exported by `tfmp.export`, which writes the SavedModels.

Example:

    serving_signature("/tmp/serving/1")["outputs"]    # {'output_0': ('float32', (None, 2))}
"""

from __future__ import annotations

import os
from typing import Any

import keras

from tfmp import _tf

SIGNATURE = "serving_default"


def _is_float(dtype) -> bool:
    return "float" in keras.backend.standardize_dtype(dtype)


def serving_signature(export_dir: str | os.PathLike, signature: str = SIGNATURE) -> dict:
    """Reads a signature's inputs and outputs from `saved_model.pb`, without loading it.

    Args:
        export_dir: A SavedModel directory.
        signature: The signature key.

    Returns:
        `{"inputs": {name: (dtype, shape)}, "outputs": {name: (dtype, shape)}}`,
        dtypes as strings and shapes as tuples with `None` for unknown dimensions
        (the shape is `None` for unknown rank).

    Example:

        serving_signature("/tmp/serving/1")["outputs"]
        # {'output_0': ('float32', (None, 2))}
    """
    tf = _tf.import_tensorflow("tfmp.serving")
    from tensorflow.core.protobuf import saved_model_pb2

    path = os.path.join(os.fspath(export_dir), "saved_model.pb")
    if not os.path.isfile(path):
        raise ValueError(
            f"`export_dir` holds no saved_model.pb. Received: export_dir={export_dir!r}"
        )
    proto = saved_model_pb2.SavedModel()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    signatures = proto.meta_graphs[0].signature_def
    if signature not in signatures:
        raise ValueError(
            f"Unknown `signature`: {signature!r}. Expected one of: "
            f"{', '.join(sorted(signatures))}."
        )

    def describe(infos) -> dict[str, tuple[str, Any]]:
        out = {}
        for name in sorted(infos):
            info = infos[name]
            shape = None if info.tensor_shape.unknown_rank else tuple(
                None if d.size < 0 else d.size for d in info.tensor_shape.dim
            )
            out[name] = (tf.dtypes.as_dtype(info.dtype).name, shape)
        return out

    sig = signatures[signature]
    return {"inputs": describe(sig.inputs), "outputs": describe(sig.outputs)}


def load_serving_layer(
    export_dir: str | os.PathLike,
    *,
    call_endpoint: str = SIGNATURE,
    dtype: str | None = None,
    **kwargs,
) -> keras.layers.TFSMLayer:
    """Loads a SavedModel as a `keras.layers.TFSMLayer` that works under any global policy.

    In Keras 3.15 a plain `keras.layers.TFSMLayer` built under a mixed global
    policy casts its float32 inputs to float16 (or bfloat16) before calling the
    SavedModel, which then rejects them: `TypeError: Binding inputs to tf.function
    failed due to Can not cast TensorSpec(... dtype=tf.float16 ...) to
    TensorSpec(... dtype=tf.float32 ...)` (for Keras' own `model.export()`
    artifacts called through `serving_default`: `InvalidArgumentError: ... expected
    to be a float tensor but is a half tensor`). This passes the endpoint's own
    input dtype (the export's `serving_dtype`) as the layer's `dtype`, so inputs
    reach the SavedModel as it expects. The outputs are what the SavedModel
    returns (float32 for a default `export_saved_model`).

    Args:
        export_dir: A SavedModel directory, e.g. written by `export_saved_model`.
        call_endpoint: The endpoint or signature to call.
        dtype: The layer's dtype; by default the first floating input dtype of the
            `call_endpoint` signature (float32 if it has none).
        **kwargs: Passed on to `keras.layers.TFSMLayer` (`name`, `trainable`, ...).

    Returns:
        The `keras.layers.TFSMLayer`.

    Example:

        tfmp.set_global_policy("mixed_float16")
        layer = tfmp.export.load_serving_layer("/tmp/serving/1")
        layer(np.ones((2, 4), "float32"))   # float32 in, float32 out
    """
    if dtype is None:
        dtype = "float32"
        for input_dtype, _ in serving_signature(export_dir, call_endpoint)["inputs"].values():
            if _is_float(input_dtype):
                dtype = input_dtype
                break
    return keras.layers.TFSMLayer(
        os.fspath(export_dir), call_endpoint=call_endpoint, dtype=dtype, **kwargs
    )
