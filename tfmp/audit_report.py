"""The precision audit's report: per-layer rows, gradient statistics, table and plot.

`tfmp.audit.audit_model` fills these; this module holds the data and its
presentation (`to_dict()` for JSON, `table()`/`str()` for text, `plot()` for a
PNG), the float16/bfloat16 limits they are measured against, and the helpers
that define report fields: `fnmatch_escape` (a row's `pattern`),
`recommended_loss_scale` (`recommended_initial_scale`) and `nonfinite_counts`
(`nonfinite_inputs`: NaN/inf in the audited batch, a finding, not an error).
See `tfmp.audit` for what each number means and when a layer is recommended for
float32. `to_dict()` is strict JSON (non-finite numbers become None) and
`plot()` writes its file atomically. It needs NumPy only (matplotlib for
`plot()`), not TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from tfmp import _io

FLOAT16_MAX = 65504.0
FLOAT16_TINY = 2.0**-24  # Smallest float16 subnormal: smaller values flush to 0.
BFLOAT16_MAX = 3.3895313892515355e38
BFLOAT16_TINY = 2.0**-126  # Smallest normal: bfloat16 subnormals are usually flushed.
GRADIENT_HEADROOM = 2.0**-5
MIN_LOSS_SCALE = 1.0
MAX_LOSS_SCALE = 2.0**24

_LIMITS = {  # dtype -> (largest finite value, smallest value kept)
    "float16": (FLOAT16_MAX, FLOAT16_TINY),
    "bfloat16": (BFLOAT16_MAX, BFLOAT16_TINY),
    "float32": (float(np.finfo(np.float32).max), 2.0**-149),
    "float64": (float(np.finfo(np.float64).max), 2.0**-1074),
}


def fnmatch_escape(name: str) -> str:
    """Escapes `name` so that `fnmatch` matches it literally (`*`, `?`, `[` bracketed).

    Args:
        name: A layer name.

    Returns:
        A pattern matching exactly `name`.

    Example:

        >>> fnmatch_escape("block[1]*")
        'block[[]1][*]'
    """
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def recommended_loss_scale(max_abs_gradient: float) -> float:
    """The largest power of two keeping the largest scaled gradient well inside float16.

    Args:
        max_abs_gradient: The largest |gradient| of a float32 backward pass.

    Returns:
        `2**k` with `max_abs_gradient * 2**k <= 65504 * GRADIENT_HEADROOM`, clamped
        to [`MIN_LOSS_SCALE`, `MAX_LOSS_SCALE`]; `MAX_LOSS_SCALE` for a zero gradient.

    Example:

        >>> recommended_loss_scale(1e-3)   # 65504 / 32 / 1e-3 ~ 2.05e6 -> 2**20
        1048576.0
    """
    if not max_abs_gradient > 0 or not math.isfinite(max_abs_gradient):
        return MAX_LOSS_SCALE if max_abs_gradient == 0 else MIN_LOSS_SCALE
    exponent = math.floor(math.log2(FLOAT16_MAX * GRADIENT_HEADROOM / max_abs_gradient))
    lo, hi = int(math.log2(MIN_LOSS_SCALE)), int(math.log2(MAX_LOSS_SCALE))
    return float(2.0 ** min(max(exponent, lo), hi))


def nonfinite_counts(x, y=None) -> dict[str, int]:
    """Counts the NaN and infinite values of a batch, by argument.

    Args:
        x: An array, a list of arrays or a dict of arrays.
        y: The targets, or None.

    Returns:
        `{name: count}` for the arrays holding any (`x`, `x[0]`, `x['a']`, `y`).

    Example:

        >>> nonfinite_counts([np.ones(3), np.array([np.nan, np.inf])], np.zeros(2))
        {'x[1]': 2}
    """
    if isinstance(x, dict):
        named = {f"x[{key!r}]": value for key, value in x.items()}
    elif isinstance(x, (list, tuple)):
        named = {f"x[{i}]": value for i, value in enumerate(x)}
    else:
        named = {"x": x}
    if y is not None:
        named["y"] = y
    arrays = {name: np.asarray(value) for name, value in named.items()}
    counts = {name: int(a.size - np.count_nonzero(np.isfinite(a)))
              for name, a in arrays.items() if a.dtype.kind in "fc"}
    return {name: n for name, n in counts.items() if n}


@dataclasses.dataclass
class LayerAudit:
    """One layer's row of an `AuditReport` (see the `tfmp.audit` docstring).

    Attributes:
        name: The layer name, `outer/inner` inside nested models.
        pattern: The bare layer name as an exact `fnmatch` pattern for
            `apply_policy(float32_names=...)`.
        type: The layer class name (`op:Add` for a `keras.ops` call).
        dtype: The layer's output dtype in the mixed run.
        compute_dtype: The layer's compute dtype in the mixed run.
        max_abs_activation: Largest |activation| of the float32 run.
        min_abs_activation: Smallest non-zero |activation| of the float32 run
            (None if all are zero).
        overflow: Whether the activation does not fit `dtype`, or the mixed run
            makes inf/NaN here from finite inputs.
        underflow_fraction: Share of non-zero float32 activations that `dtype`
            flushes to zero.
        relative_error: `||mixed - float32|| / ||float32||` (inf if not finite).
        recommend_float32: Whether this layer should compute in float32.
        reason: Why (empty when nothing is wrong).
    """

    name: str
    pattern: str
    type: str
    dtype: str
    compute_dtype: str
    max_abs_activation: float
    min_abs_activation: float | None
    overflow: bool
    underflow_fraction: float
    relative_error: float
    recommend_float32: bool = False
    reason: str = ""
    # Internal: what the consumers of this layer need to know.
    is_layer: bool = dataclasses.field(default=True, repr=False)
    mixed_finite: bool = dataclasses.field(default=True, repr=False)
    out_of_range: str = dataclasses.field(default="", repr=False)
    producers: list = dataclasses.field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """This row as a JSON-ready dict (non-finite numbers become None)."""
        return {
            "name": self.name,
            "pattern": self.pattern,
            "type": self.type,
            "dtype": self.dtype,
            "compute_dtype": self.compute_dtype,
            "max_abs_activation": _finite_or_none(self.max_abs_activation),
            "min_abs_activation": _finite_or_none(self.min_abs_activation),
            "overflow": self.overflow,
            "underflow_fraction": self.underflow_fraction,
            "relative_error": _finite_or_none(self.relative_error),
            "recommend_float32": self.recommend_float32,
            "reason": self.reason,
        }


@dataclasses.dataclass
class GradientAudit:
    """The float32 gradients of one batch against float16's (or bfloat16's) range.

    Attributes:
        count: Number of gradient values (weights and top-level activations).
        nonzero: Number of non-zero values (the denominator of the fractions).
        max_abs: Largest |gradient|.
        min_abs: Smallest non-zero |gradient| (None if all are zero).
        histogram: `{"exponents": [e...], "counts": [n...]}`: `n` non-zero
            values with `2**e <= |g| < 2**(e+1)`, for every `e` from the
            smallest to the largest.
        underflow_fraction_unscaled: Share of non-zero values below the
            dtype's smallest kept value (2**-24 for float16) without scaling.
        underflow_fraction_scaled: The same after multiplying by `scale`.
        overflow_fraction_scaled: Share of values above the dtype's maximum
            after multiplying by `scale`.
        scale: The loss scale used for the scaled fractions.
        weights: `count`, `max_abs` and the two underflow fractions of the
            weight gradients alone.
        activations: The same for the activation gradients alone.
    """

    count: int
    nonzero: int
    max_abs: float
    min_abs: float | None
    histogram: dict[str, list[int]]
    underflow_fraction_unscaled: float
    underflow_fraction_scaled: float
    overflow_fraction_scaled: float
    scale: float
    weights: dict[str, Any]
    activations: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """These statistics as a JSON-ready dict (non-finite numbers become None)."""
        return _json_safe(dataclasses.asdict(self))


@dataclasses.dataclass
class AuditReport:
    """What `audit_model` found. `str(report)` is the table.

    Attributes:
        model: The model's name.
        policy: The policy of the mixed run (None: the model's own policies).
        dtype: The low-precision dtype audited against (`float16`/`bfloat16`).
        layers: One `LayerAudit` per layer, in graph order.
        gradients: A `GradientAudit`, or None when no `y` was given.
        recommended_initial_scale: See `recommended_loss_scale`; None without
            gradients or under bfloat16.
        nonfinite_inputs: `{input: count}` of NaN/inf values in the batch (see
            `nonfinite_counts`); the numbers of the layers they reach describe
            the data, not the precision.
    """

    model: str
    policy: str | None
    dtype: str
    layers: list[LayerAudit]
    gradients: GradientAudit | None
    recommended_initial_scale: float | None
    nonfinite_inputs: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def recommended_float32_layers(self) -> list[str]:
        """Exact `fnmatch` patterns of the layers to keep in float32, for `apply_policy`."""
        names = []
        for row in self.layers:
            if row.recommend_float32 and row.pattern not in names:
                names.append(row.pattern)
        return names

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (`json.dumps` works on it as is)."""
        return {
            "model": self.model,
            "policy": self.policy,
            "dtype": self.dtype,
            "layers": [row.to_dict() for row in self.layers],
            "gradients": self.gradients.to_dict() if self.gradients else None,
            "recommended_initial_scale": self.recommended_initial_scale,
            "recommended_float32_layers": self.recommended_float32_layers,
            "nonfinite_inputs": dict(self.nonfinite_inputs),
        }

    def table(self) -> str:
        """The report as a text table, one row a layer, then the gradients and advice."""
        columns = ("Layer", "Type", "Dtype", "max|a|", "min|a|>0", "Overflow", "Underflow",
                   "RelErr", "float32?", "Reason")
        rows = [(
            r.name, r.type, r.dtype, _num(r.max_abs_activation), _num(r.min_abs_activation),
            "YES" if r.overflow else "-", f"{r.underflow_fraction:.1%}",
            _num(r.relative_error), "YES" if r.recommend_float32 else "-", r.reason,
        ) for r in self.layers]
        widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(columns)]

        def line(values):
            return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

        policy = self.policy or "the model's own per-layer policies"
        lines = [f'Precision audit of "{self.model}": float32 vs {policy} ({self.dtype})',
                 line(columns), "-" * len(line(columns))]
        lines += [line(row) for row in rows]
        if self.nonfinite_inputs:
            counts = ", ".join(f"{k}: {n}" for k, n in self.nonfinite_inputs.items())
            lines.append(f"Input data is not finite ({counts} NaN/inf values): the rows and "
                         "gradients it reaches measure the data, not the precision.")
        g = self.gradients
        if g is None:
            lines.append("Gradients: not audited (no y).")
        else:
            max_scaled = g.max_abs * g.scale
            lines.append(
                f"Gradients: {g.count} values ({g.weights['count']} weight, "
                f"{g.activations['count']} activation), {g.nonzero} non-zero, "
                f"max |g| {_num(g.max_abs)}, min |g|>0 {_num(g.min_abs)}.")
            lines.append(
                f"  below {self.dtype}'s smallest value: {g.underflow_fraction_unscaled:.1%} "
                f"unscaled, {g.underflow_fraction_scaled:.1%} scaled by {_num(g.scale)} "
                f"(max scaled |g| {_num(max_scaled)}, {g.overflow_fraction_scaled:.1%} overflow).")
        if self.recommended_initial_scale is not None:
            exponent = int(math.log2(self.recommended_initial_scale))
            lines.append(f"Recommended initial loss scale: 2**{exponent} = "
                         f"{self.recommended_initial_scale:g}.")
        names = self.recommended_float32_layers
        lines.append(f"Recommended float32 layers: {names if names else 'none'}")
        if names:
            lines.append(f"  tfmp.convert.apply_policy(model, {self.policy or 'policy'!r}, "
                         f"float32_names={names})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str) -> str:
        """Writes a PNG: per-layer activation ranges and the gradient histogram.

        Left, the largest and smallest non-zero |activation| of each layer (log
        scale) against the dtype's largest value and smallest kept value; right,
        the histogram of log2 |gradient| with the underflow line, as in Figure 3
        of the mixed precision training paper (Micikevicius et al., 2018).
        Needs matplotlib (the Agg canvas; the global backend is not changed).
        The file is written atomically: a failed plot keeps a previous one.

        Args:
            path: The PNG file to write.

        Returns:
            `path`.
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError(
                "AuditReport.plot() needs matplotlib: pip install matplotlib") from e
        top, tiny = _LIMITS[self.dtype]
        fig = Figure(figsize=(14, 5), layout="constrained")
        FigureCanvasAgg(fig)
        ax_act, ax_grad = fig.subplots(1, 2, width_ratios=(3, 2))
        idx = np.arange(len(self.layers))
        hi = [r.max_abs_activation if r.max_abs_activation > 0 else np.nan for r in self.layers]
        lo = [r.min_abs_activation or np.nan for r in self.layers]
        ax_act.vlines(idx, lo, hi, color="0.7", linewidth=1)
        ax_act.scatter(idx, hi, marker="^", label="max |activation|", zorder=3)
        ax_act.scatter(idx, lo, marker="v", label="min non-zero |activation|", zorder=3)
        flagged = [i for i, r in enumerate(self.layers) if r.recommend_float32]
        if flagged:
            ax_act.scatter(idx[flagged], np.asarray(hi)[flagged], s=120, facecolors="none",
                           edgecolors="red", label="recommended float32", zorder=4)
        ax_act.axhline(top, color="red", linestyle="--", label=f"{self.dtype} max ({top:.4g})")
        ax_act.axhline(tiny, color="purple", linestyle="--",
                       label=f"{self.dtype} smallest kept ({tiny:.3g})")
        ax_act.set_yscale("log")
        ax_act.set_ylabel("|activation| (float32 run)")
        ax_act.set_title(f"Activation range per layer: {self.model}")
        if len(self.layers) <= 60:
            ax_act.set_xticks(idx, [r.name for r in self.layers], rotation=90, fontsize=6)
        else:
            ax_act.set_xlabel("layer index")
        ax_act.legend(fontsize=7, loc="best")
        g = self.gradients
        if g is None or not g.histogram["exponents"]:
            text = "no gradients audited (no y)" if g is None else "every gradient is zero"
            ax_grad.text(0.5, 0.5, text, ha="center", va="center")
            ax_grad.set_axis_off()
        else:
            ax_grad.bar(g.histogram["exponents"], g.histogram["counts"], width=0.9,
                        color="tab:blue")
            ax_grad.axvline(math.log2(tiny), color="purple", linestyle="--",
                            label=f"{self.dtype} underflow (2**{math.log2(tiny):.0f})")
            if self.dtype == "float16":
                ax_grad.axvline(math.log2(FLOAT16_MAX), color="red", linestyle="--",
                                label="float16 overflow")
            if g.scale != 1.0:
                ax_grad.axvline(math.log2(tiny) - math.log2(g.scale), color="green",
                                linestyle=":", label=f"underflow after scaling by {g.scale:g}")
            ax_grad.set_yscale("log")
            ax_grad.set_xlabel("log2 |gradient| (float32, non-zero)")
            ax_grad.set_ylabel("count")
            ax_grad.set_title("Gradient magnitudes")
            ax_grad.legend(fontsize=7)
        with _io.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        return path


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return _finite_or_none(value)
    return value


def _finite_or_none(value):
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _num(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}"


__all__ = [
    "BFLOAT16_MAX", "BFLOAT16_TINY", "FLOAT16_MAX", "FLOAT16_TINY", "GRADIENT_HEADROOM",
    "MAX_LOSS_SCALE", "MIN_LOSS_SCALE", "AuditReport", "GradientAudit", "LayerAudit",
    "fnmatch_escape", "nonfinite_counts", "recommended_loss_scale",
]
