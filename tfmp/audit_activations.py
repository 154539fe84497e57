"""The precision audit's per-layer rows: activation statistics and the float32 rules.

`tfmp.audit.audit_model` walks the model's graph (`tfmp.audit_graph`) and, for
every layer or `keras.ops` call, hands this module the float32 and the mixed
outputs; `_layer_audit` measures them into a `LayerAudit` row and decides
whether the layer should compute in float32 (see the `tfmp.audit` docstring for
the four rules and the thresholds below). Numpy only: no backend is involved.

Example:

    row = _layer_audit(op, "", [(ref, mixed)], "float16", "float16", input_rows)
    row.recommend_float32, row.reason
"""

from __future__ import annotations

import math

import keras
import numpy as np

from tfmp.audit_report import _LIMITS, LayerAudit, fnmatch_escape

UNDERFLOW_THRESHOLD = 0.01
ERROR_THRESHOLD = 0.1
ERROR_JUMP = 10.0

_LOW_DTYPES = ("float16", "bfloat16")


def _layer_audit(op, prefix: str, pairs: list, dtype: str, audited: str,
                 input_rows: list[LayerAudit]) -> LayerAudit:
    """The row of `op`, recommended for float32 or not, its `keras.ops` producers blamed.

    Args:
        op: The layer or `keras.ops` operation of the mixed model.
        prefix: `outer/` for a layer of a nested model, else `""`.
        pairs: `(float32 output, mixed output)` numpy arrays, one per float output.
        dtype: The dtype `op` outputs in the mixed run.
        audited: The low-precision dtype audited against (`float16`/`bfloat16`).
        input_rows: The rows of the layers that produce `op`'s inputs.
    """
    row = _measure(op, prefix, pairs, dtype, audited, input_rows)
    _recommend(row, _reasons(row))
    return row


def _measure(op, prefix: str, pairs: list, dtype: str, audited: str,
             input_rows: list[LayerAudit]) -> LayerAudit:
    """The statistics of `op`'s outputs as a row, nothing recommended yet."""
    is_layer = isinstance(op, keras.layers.Layer)
    ref = np.concatenate([r.astype(np.float64).ravel() for r, _ in pairs])
    mixed = np.concatenate([m.astype(np.float64).ravel() for _, m in pairs])
    ref_abs = np.abs(ref[np.isfinite(ref)])
    nonzero = ref_abs[ref_abs > 0]
    top, tiny = _LIMITS.get(dtype, _LIMITS["float32"])
    max_abs = float(ref_abs.max()) if ref_abs.size else 0.0
    return LayerAudit(
        name=prefix + op.name, pattern=fnmatch_escape(op.name),
        type=type(op).__name__ if is_layer else f"op:{type(op).__name__}",
        dtype=dtype, compute_dtype=op.compute_dtype if is_layer else dtype,
        max_abs_activation=max_abs,
        min_abs_activation=float(nonzero.min()) if nonzero.size else None,
        overflow=_overflows(ref, mixed, max_abs, top, input_rows),
        underflow_fraction=float(np.mean(nonzero < tiny)) if nonzero.size else 0.0,
        relative_error=_relative_error(ref, mixed), is_layer=is_layer,
        mixed_finite=bool(np.all(np.isfinite(mixed))),
        out_of_range=_out_of_range(max_abs, nonzero, audited), producers=input_rows)


def _overflows(ref: np.ndarray, mixed: np.ndarray, max_abs: float, top: float,
               input_rows: list[LayerAudit]) -> bool:
    """Too large for the output dtype, or inf/NaN made here from finite inputs."""
    new_nonfinite = bool(np.any(~np.isfinite(mixed) & np.isfinite(ref)))
    inputs_finite = all(row.mixed_finite for row in input_rows)
    return max_abs > top or (new_nonfinite and inputs_finite)


def _relative_error(ref: np.ndarray, mixed: np.ndarray) -> float:
    """`||mixed - ref|| / ||ref||` over `ref`'s finite values; inf if `mixed` is not finite."""
    if not np.all(np.isfinite(mixed)):
        return math.inf
    norm = float(np.linalg.norm(ref[np.isfinite(ref)]))
    diff = float(np.linalg.norm(np.nan_to_num(mixed - ref)))
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def _out_of_range(max_abs: float, nonzero: np.ndarray, audited: str) -> str:
    """Why these float32 activations do not fit `audited` (`""` if they do)."""
    low_top, low_tiny = _LIMITS[audited]
    if max_abs > low_top:
        return f"max |activation| {max_abs:.3g} > {audited} max {low_top:.6g}"
    if nonzero.size and np.mean(nonzero < low_tiny) > UNDERFLOW_THRESHOLD:
        return (f"{np.mean(nonzero < low_tiny):.0%} of non-zero activations < "
                f"{audited} smallest {low_tiny:.3g}")
    return ""


def _reasons(row: LayerAudit) -> list[str]:
    """What is wrong with `row` by the four rules, in order (possibly repeated)."""
    top, tiny = _LIMITS.get(row.dtype, _LIMITS["float32"])
    reasons = []
    if row.overflow:
        reasons.append(row.out_of_range if row.max_abs_activation > top else
                       f"{row.dtype} run turns finite inputs into inf/NaN")
    if row.underflow_fraction > UNDERFLOW_THRESHOLD:
        reasons.append(f"{row.underflow_fraction:.0%} of non-zero activations < {row.dtype} "
                       f"smallest {tiny:.3g} (flushed to 0)")
    for producer in row.producers:
        if row.compute_dtype in _LOW_DTYPES and producer.out_of_range:
            reasons.append(f"input from {producer.name!r} out of {row.compute_dtype} range "
                           f"({producer.out_of_range})")
    error, worst_input = row.relative_error, max(
        (producer.relative_error for producer in row.producers), default=0.0)
    if (math.isfinite(error) and error > ERROR_THRESHOLD
            and math.isfinite(worst_input) and error >= ERROR_JUMP * worst_input):
        reasons.append(f"relative error {error:.2g} (inputs' {worst_input:.2g})")
    return reasons


def _recommend(row: LayerAudit, reasons: list[str]) -> None:
    """Sets `row`'s recommendation; a failing `keras.ops` call blames its producers instead."""
    if row.is_layer:
        row.recommend_float32 = row.compute_dtype in _LOW_DTYPES and bool(reasons)
        row.reason = "; ".join(dict.fromkeys(reasons))
    elif reasons:
        # A keras.ops call follows its inputs' dtype: its producers must be float32.
        row.reason = ("keras.ops call follows its inputs' dtype: " + "; ".join(
            dict.fromkeys(reasons)))
        if row.overflow or row.underflow_fraction > UNDERFLOW_THRESHOLD:
            _blame_producers(row, reasons[0])


def _blame_producers(row: LayerAudit, reason: str) -> None:
    """Recommends float32 for the low-precision layers that feed `row`, through other ops."""
    for producer in row.producers:
        if producer.is_layer:
            if producer.compute_dtype in _LOW_DTYPES:
                producer.recommend_float32 = True
                extra = f"feeds {row.name!r} ({reason})"
                producer.reason = "; ".join(r for r in (producer.reason, extra) if r)
        else:
            _blame_producers(producer, reason)
