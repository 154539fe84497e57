"""`summary(model)`: one row a layer with its policy, dtypes and tensor-core dimensions.

Backend-agnostic (Keras only). Re-exported as `tfmp.convert.summary` and
`tfmp.summary`; `python -m tools.inspect_policy model.keras` prints it.

Example:

    rows = summary(model)   # prints the table; rows are JSON-ready dicts
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import tree

from tfmp.placement import is_graph_model as _is_graph_model

# Tensor cores run float16/bfloat16 matmuls and convolutions at full speed
# only when these dimensions are multiples of 8.
_TENSOR_CORE_MULTIPLE = 8


def _dims(layer) -> dict[str, int]:
    """The tensor-core-relevant dimensions of a layer (empty for most layers)."""
    dims: dict[str, int] = {}
    if isinstance(layer, keras.layers.MultiHeadAttention):
        heads = layer.num_heads
        dims["num_heads*key_dim"] = heads * layer.key_dim
        dims["num_heads*value_dim"] = heads * (layer.value_dim or layer.key_dim)
        return dims
    if isinstance(layer, keras.layers.Embedding):
        dims["input_dim"] = layer.input_dim
        dims["output_dim"] = layer.output_dim
        return dims
    if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        kernel = getattr(layer, "kernel", None)
        if kernel is not None:
            dims["channels"] = int(kernel.shape[-2]) * int(kernel.shape[-1])
        return dims
    for attr in ("units", "filters"):
        value = getattr(layer, attr, None)
        if isinstance(value, int):
            dims[attr] = value
    return dims


def _output_dtype(layer) -> str | None:
    try:
        outputs = tree.flatten(layer.output)
    except (AttributeError, ValueError, RuntimeError):
        return None  # Never called (e.g. an unbuilt Sequential).
    dtypes = []
    for t in outputs:
        dtype = keras.backend.standardize_dtype(t.dtype) if hasattr(t, "dtype") else None
        if dtype and dtype not in dtypes:
            dtypes.append(dtype)
    return ",".join(dtypes) or None


def _rows(model, prefix: str) -> list[dict[str, Any]]:
    rows = []
    for layer in model.layers:
        name = prefix + layer.name
        dims = _dims(layer)
        rows.append({
            "name": name,
            "type": type(layer).__name__,
            "policy": layer.dtype_policy.name,
            "compute_dtype": layer.compute_dtype,
            "variable_dtype": layer.variable_dtype,
            "output_dtype": _output_dtype(layer),
            "dims": dims,
            "not_multiple_of_8": sorted(
                k for k, v in dims.items() if v % _TENSOR_CORE_MULTIPLE),
        })
        if _is_graph_model(layer):
            rows.extend(_rows(layer, name + "/"))
    return rows


_COLUMNS = (
    ("name", "Layer"), ("type", "Type"), ("policy", "Policy"), ("compute_dtype", "Compute"),
    ("variable_dtype", "Variables"), ("output_dtype", "Output"), ("mark", "Not x8"),
)


def summary(model: keras.Model, *, print_fn: Callable[[str], Any] = print) -> list[dict[str, Any]]:
    """Prints each layer's dtype policy and flags dimensions that are not multiples of 8.

    One row a layer (the layers of nested models follow their model, named
    `outer/inner`): name, type, policy, compute dtype, variable dtype, output
    dtype (of the layer's first call; None if never called) and, under
    "Not x8", the units/filters/channels/embedding/attention dimensions that are
    not multiples of 8 (float16 tensor cores need multiples of 8). The mark is
    given whatever the layer's policy, so a float32 model can be checked before
    conversion.

    Args:
        model: A Keras model (any kind; subclassed models list their top-level layers).
        print_fn: Called with each line of the table.

    Returns:
        The rows as JSON-ready dicts with keys `name`, `type`, `policy`,
        `compute_dtype`, `variable_dtype`, `output_dtype`, `dims` (dimension name
        to value) and `not_multiple_of_8` (names of the offending dimensions).

    Example:

        rows = summary(keras.Sequential([keras.Input((4,)), keras.layers.Dense(10)]))
        # prints the table; rows[0]["not_multiple_of_8"] == ["units"]
        json.dumps(rows)   # JSON-ready
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`model` must be a keras.Model. Received: model={model!r} of type "
            f"{type(model).__name__}"
        )
    rows = _rows(model, "")
    table = [
        {**row, "output_dtype": row["output_dtype"] or "?",
         "mark": " ".join(f"{k}={row['dims'][k]}" for k in row["not_multiple_of_8"])}
        for row in rows
    ]
    widths = [max([len(title)] + [len(str(r[key])) for r in table]) for key, title in _COLUMNS]

    def line(values):
        return "  ".join(str(v).ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    print_fn(f'Model: "{model.name}"')
    print_fn(line(title for _, title in _COLUMNS))
    print_fn("-" * len(line(title for _, title in _COLUMNS)))
    for r in table:
        print_fn(line(r[key] for key, _ in _COLUMNS))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["policy"]] = counts.get(row["policy"], 0) + 1
    by_policy = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
    marked = sum(bool(row["not_multiple_of_8"]) for row in rows)
    print_fn(f"{len(rows)} layers: {by_policy}; {marked} with dimensions not multiples of 8.")
    return rows
