"""The side-by-side training benchmark behind `python -m tools.benchmark`.

`benchmark` trains one model (`tfmp.benchmark_models`: resnet50, transformer,
mlp, ... or a `.keras` file) under float32, mixed_float16 and mixed_bfloat16,
the rows taking turns (`tfmp.benchmark_runner`), and compares each row to the
float32 baseline: throughput, step time, peak memory, activation memory per
example, on a GPU the largest batch that trains, and the cost of loss scaling
(plain Adam vs Keras' and tfmp's `LossScaleOptimizer`). `format_table` renders
the results as the tool prints them. What is measured and how, the published
anchors and the targets are in `tools/benchmark.py`'s docstring (its `--help`).

Runs on the TensorFlow and the JAX backend; under JAX, TensorFlow is never
imported. `import tfmp` does not import this module (it is the tool's library).

Example:

    from tfmp import benchmark
    results = benchmark.benchmark(model="mlp", hidden=64, num_layers=2, batch_size=16, steps=2)
    print(benchmark.format_table(results))
"""

from __future__ import annotations

import functools
import math
import os
import statistics
from collections.abc import Callable, Sequence

from tfmp import benchmark_models
from tfmp import benchmark_runner as runner

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
BACKENDS = ("tensorflow", "jax")
OPTIMIZERS = {"plain": "Adam (plain)", "keras": "keras.optimizers.LossScaleOptimizer",
              "tfmp": "tfmp.LossScaleOptimizer"}


def variants(policies: Sequence[str], tf32: bool, strict_float32: bool = True
             ) -> list[tuple[str, str, bool]]:
    """The rows `(name, policy, tf32)` to time; the first is the ratios' baseline.

    Args:
        policies: Policies, `"float32"` first.
        tf32: Whether the device has TF32 (an Ampere or later GPU).
        strict_float32: With TF32, also time float32 with TF32 off.

    Returns:
        One `(row name, policy, TF32 on)` per row, in the order they are timed.

    Example:

        >>> [v[0] for v in variants(["float32", "mixed_float16"], tf32=True)]
        ['float32 (tf32)', 'float32 (highest)', 'mixed_float16']
    """
    rows = []
    for p in policies:
        if p == "float32" and tf32:
            rows.append(("float32 (tf32)", p, True))
            rows += [("float32 (highest)", p, False)] if strict_float32 else []
        else:
            rows.append((p, p, True))
    return rows


def _ratio(value: float | None, reference: float | None) -> float | None:
    """`value / reference`, None when either is missing (or zero)."""
    return value / reference if value and reference else None


def _row(measured: dict, base: dict, spec: runner.Spec, steps: int) -> dict:
    """One row's medians, and its time ratios to the baseline's measurements `base`."""
    walls, cpus = [w for w, _ in measured["times"]], [c for _, c in measured["times"]]
    pairs = list(zip(measured["times"], base["times"], strict=True))
    return {
        "policy": spec.policy, "tf32": spec.tf32,
        "examples_per_second": spec.batch_size * steps / statistics.median(walls),
        "step_ms": 1000 * statistics.median(walls) / steps,
        "cpu_ms_per_step": 1000 * statistics.median(cpus) / steps, **measured["final"],
        **{k: measured["info"][k] for k in ("activation_bytes_per_example", "params")},
        "speedup": statistics.median(wb / w for (w, _), (wb, _) in pairs),
        "step_time_ratio": statistics.median(w / wb for (w, _), (wb, _) in pairs),
        "cpu_time_ratio": statistics.median(c / cb for (_, c), (_, cb) in pairs),
    }


def _rows(measured: dict[str, dict], specs: dict[str, runner.Spec], steps: int) -> dict[str, dict]:
    """Every row of `runner.interleave`'s measurements: medians and ratios to the first row."""
    base = measured[next(iter(measured))]
    rows = {n: _row(m, base, specs[n], steps) for n, m in measured.items()}
    ref = rows[next(iter(rows))]
    for row in rows.values():
        row["memory_ratio"] = _ratio(row["peak_memory_mib"], ref["peak_memory_mib"])
        row["activation_memory_ratio"] = (row["activation_bytes_per_example"]
                                          / ref["activation_bytes_per_example"])
    return rows


def _max_batches(specs: dict[str, runner.Spec], limit: int) -> dict[str, tuple[int, bool]]:
    """`find_max_batch` per row but strict float32, each alone on the GPU in a fresh process."""
    found = {}
    for name, spec in specs.items():
        if spec.tf32:
            searcher = runner.Process(spec, task="max_batch", limit=limit)
            try:
                found[name] = searcher.receive()
            finally:
                searcher.close()
    return found


def _add_max_batches(rows: dict[str, dict], found: dict[str, tuple[int, bool]]) -> None:
    """Sets every row's `max_batch_size`, `max_batch_capped` and `max_batch_ratio` (to the
    first row's), None where `found` has no size for the row."""
    base = rows[next(iter(rows))]
    for name, row in rows.items():
        row["max_batch_size"], row["max_batch_capped"] = found.get(name, (None, None))
        row["max_batch_ratio"] = _ratio(row["max_batch_size"], base["max_batch_size"])


def _max_batch_note(requested: bool, gpu: bool, every_row: bool) -> str:
    """The results' `max_batch_search`: whether the search ran, and if not, why."""
    if not requested:
        return "skipped: --nomax_batch_search"
    if not gpu:
        return ("skipped: no GPU (on a CPU, memory is swapped or grows instead of running "
                "out)")
    return "searched" + ("" if every_row
                         else " (not for float32 (highest): same memory as tf32)")


def _float32_mode(tf32: bool, gpu: bool) -> str:
    """The results' `float32_mode`: what the float32 baseline computes in."""
    if tf32:
        return "tf32"
    return f"float32 (no TF32 on a {'GPU before Ampere' if gpu else 'CPU'})"


def _optimizer_overhead(spec: Callable[..., runner.Spec], run: Callable[..., dict],
                        steps: int) -> dict:
    """The plain Adam, Keras' and tfmp's LossScaleOptimizer under mixed_float16, timed by
    `run` (`runner.interleave`); ratios to the plain one."""
    specs = {k: spec(name=k, policy="mixed_float16", optimizer=k) for k in OPTIMIZERS}
    return {"policy": "mixed_float16", "optimizers": _rows(run(specs), specs, steps)}


def _check(*, policies: tuple[str, ...], steps: int, repeats: int, warmup: int,
           max_batch_limit: int, model: str, model_file: str | None, sizes: dict
           ) -> tuple[benchmark_models.ModelConfig, int]:
    """Raises `tfmp.cli.UsageError` (a `ValueError`) for a bad argument of `benchmark`."""
    from tfmp import _checks, cli

    with cli.usage_errors():
        if runner.backend() not in BACKENDS:
            raise ValueError(f"tools.benchmark runs on KERAS_BACKEND={' or '.join(BACKENDS)}. "
                             f"Received: KERAS_BACKEND={runner.backend()}")
        for name, value, least in (("steps", steps, 1), ("repeats", repeats, 1),
                                   ("warmup", warmup, 0), ("max_batch_limit", max_batch_limit, 1)):
            _checks.integer(name, value, minimum=least)
        if (any(p not in POLICIES for p in policies) or not policies
                or policies[0] != "float32" or len(set(policies)) != len(policies)):
            raise ValueError(
                f"`policies` must list distinct policies from {', '.join(POLICIES)}, float32 "
                f"first (the ratios are to float32). Received: policies={list(policies)}")
        return benchmark_models.resolve(model, model_file, **sizes)


def benchmark(*, model: str = "resnet_mini", model_file: str | None = None,
              policies: Sequence[str] = POLICIES, batch_size: int | None = None, steps: int = 10,
              repeats: int = 5, warmup: int = 3, image_size: int | None = None,
              hidden: int | None = None, num_heads: int | None = None, seq_len: int | None = None,
              ff_dim: int | None = None, num_layers: int | None = None, jit_compile: bool = True,
              strict_float32: bool = True, optimizer_overhead: bool = True, isolate: bool = True,
              max_batch_search: bool = True, max_batch_limit: int = 65536, seed: int = 0,
              progress: bool = True) -> dict:
    """Trains one model under each policy, interleaved, and compares them to float32.

    Args:
        model: A `tfmp.benchmark_models.model_names()` name, on synthetic data
            (ignored when `model_file` is given).
        model_file: A `.keras` file, converted per policy with
            `tfmp.convert.apply_policy`, trained on random inputs and labels.
        policies: Policies to compare, `"float32"` first.
        batch_size: Examples per step (None: the model's default).
        steps: Steps per timed measurement.
        repeats: Timed measurements per row, interleaved.
        warmup: Untimed steps before the first measurement (compilation included).
        image_size, hidden, num_heads, seq_len, ff_dim, num_layers: The model's
            sizes (None: its defaults; see `tfmp.benchmark_models`).
        jit_compile: XLA-compile the train step.
        strict_float32: On a GPU with TF32, also time float32 with TF32 off.
        optimizer_overhead: Also time the plain Adam, Keras' and tfmp's
            LossScaleOptimizer under mixed_float16.
        isolate: One process per row (peak memory per row); False runs all rows
            in this process (quicker to start; peak memory is then None).
        max_batch_search: On a GPU, search the largest batch per policy.
        max_batch_limit: The largest batch the search tries.
        seed: Seed of the initial weights and the batch.
        progress: Show a `keras.utils.Progbar`.

    Returns:
        `{"config", "backend", "device", "float32_mode", "baseline",
        "max_batch_search", "policies": {row: {...}}, "optimizer_overhead"}`.
        Each row has `policy`, `tf32`, `examples_per_second` (from the median
        measurement time), `step_ms`, `cpu_ms_per_step` (process CPU time),
        `peak_memory_mib` (None when not measured), `memory_kind`,
        `final_loss`, `activation_bytes_per_example`, `params`,
        `max_batch_size` (None when not searched), `max_batch_capped`, and the
        ratios to the baseline row: `speedup` (median of per-repeat
        examples/second ratios), `step_time_ratio`, `cpu_time_ratio`,
        `memory_ratio`, `activation_memory_ratio` and `max_batch_ratio`.
        `optimizer_overhead` (None when not run) is `{"policy": "mixed_float16",
        "optimizers": {"plain" | "keras" | "tfmp": row}}`, ratios to "plain".

    Raises:
        tfmp.cli.UsageError: (a `ValueError`) for a bad argument, before anything runs.

    Example:

        results = benchmark(model="mlp", hidden=64, num_layers=2, batch_size=16, steps=2)
        results["policies"]["mixed_float16"]["activation_memory_ratio"]   # ~0.5
    """
    policies = tuple(policies)
    sizes = dict(batch_size=batch_size, image_size=image_size, hidden=hidden,
                 num_heads=num_heads, seq_len=seq_len, ff_dim=ff_dim, num_layers=num_layers)
    config, batch_size = _check(policies=policies, steps=steps, repeats=repeats, warmup=warmup,
                                max_batch_limit=max_batch_limit, model=model,
                                model_file=model_file, sizes=sizes)
    device = runner.device_name()
    gpu = device.startswith("GPU")
    tf32 = gpu and runner.has_tf32()
    spec = functools.partial(runner.Spec, model=config, batch_size=batch_size, warmup=warmup,
                             jit_compile=jit_compile, seed=seed)
    specs = {name: spec(name=name, policy=p, tf32=t)
             for name, p, t in variants(policies, tf32, strict_float32)}
    run = functools.partial(runner.interleave, steps=steps, repeats=repeats, isolate=isolate,
                            progress=progress)
    rows = _rows(run(specs), specs, steps)
    found = _max_batches(specs, max_batch_limit) if max_batch_search and gpu else {}
    _add_max_batches(rows, found)
    overhead = _optimizer_overhead(spec, run, steps) if optimizer_overhead else None
    return {
        "config": {"model": os.path.basename(model_file) if model_file else model,
                   **config.sizes(), "batch_size": batch_size, "steps": steps,
                   "repeats": repeats, "warmup": warmup, "jit_compile": jit_compile,
                   "isolate": isolate, "seed": seed},
        "backend": runner.backend(), "device": device, "baseline": next(iter(rows)),
        "float32_mode": _float32_mode(tf32, gpu),
        "max_batch_search": _max_batch_note(max_batch_search, gpu, len(found) == len(rows)),
        "policies": rows, "optimizer_overhead": overhead}


def _fmt(value: float | None, width: int, spec: str, suffix: str = "") -> str:
    """`value` in `spec` with `suffix`, right-aligned in `width`; "-" for None or non-finite."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-".rjust(width)
    return f"{value:{spec}}{suffix}".rjust(width)


_MEMORY_NOTES = {"process_peak_rss": "peak MiB: peak resident memory of the row's process "
                 "(the framework's own few hundred MiB included).",
                 "gpu_peak": "peak MiB: the GPU allocator's peak in the row's process.",
                 None: "peak MiB: not measured (all rows share one process)."}


def _title_lines(results: dict) -> list[str]:
    """The table's first two lines: the model and settings, then the baseline."""
    c = results["config"]
    where = "one process per row" if c["isolate"] else "one process"
    sizes = ", ".join(f"{k} {c[k]}" for k in ("image_size", "hidden", "num_heads", "seq_len",
                                               "ff_dim", "num_layers") if k in c)
    return [f"{c['model']}{f' ({sizes})' if sizes else ''}: batch {c['batch_size']}, "
            f"{c['repeats']} interleaved repeats of {c['steps']} steps after {c['warmup']} "
            f"warm-up steps, jit_compile={c['jit_compile']}, {results['backend']} on "
            f"{results['device']} ({where}; medians)",
            f"float32 mode: {results['float32_mode']}; the ratios (x f32) are to "
            f"{results['baseline']!r}" + ("; 'float32 (highest)' is TF32 off (strict float32)"
                                          if "float32 (highest)" in results["policies"] else "")]


def _policy_line(name: str, r: dict) -> str:
    """One row of the policy table."""
    capped = ">=" if r["max_batch_capped"] else ""
    batch = f"{capped}{r['max_batch_size']}" if r["max_batch_size"] is not None else "-"
    return (f"{name:18s}{_fmt(r['examples_per_second'], 10, '.1f')}"
            f"{_fmt(r['speedup'], 8, '.2f', 'x')}{_fmt(r['step_ms'], 10, '.1f')}"
            f"{_fmt(r['cpu_ms_per_step'], 10, '.1f')}{_fmt(r['peak_memory_mib'], 10, '.0f')}"
            f"{_fmt(r['memory_ratio'], 8, '.2f', 'x')}"
            f"{_fmt(r['activation_bytes_per_example'] / 1024, 12, '.1f')}"
            f"{_fmt(r['activation_memory_ratio'], 8, '.2f', 'x')}{batch:>11s}"
            f"{_fmt(r['max_batch_ratio'], 8, '.2f', 'x')}{_fmt(r['final_loss'], 12, '.4f')}")


def _policy_lines(results: dict) -> list[str]:
    """The policy table: header, one line a row, the memory note and the batch search."""
    header = (f"{'policy':18s}{'ex/s':>10s}{'x f32':>8s}{'step ms':>10s}{'cpu ms':>10s}"
              f"{'peak MiB':>10s}{'x f32':>8s}{'act KiB/ex':>12s}{'x f32':>8s}"
              f"{'max batch':>11s}{'x f32':>8s}{'final loss':>12s}")
    rows = results["policies"]
    return [header, "-" * len(header), *(_policy_line(p, r) for p, r in rows.items()),
            _MEMORY_NOTES[next(iter(rows.values()))["memory_kind"]],
            f"Largest batch: {results['max_batch_search']}."]


def _overhead_lines(overhead: dict) -> list[str]:
    """The loss-scaling overhead table: a title, header, one line an optimizer."""
    header = (f"{'optimizer':38s}{'step ms':>10s}{'x plain':>9s}{'cpu ms':>10s}{'x plain':>9s}"
              f"{'peak MiB':>10s}")
    lines = [f"Loss-scaling overhead, {overhead['policy']}, same model and batch "
             "(x plain: median of per-repeat step-time ratios)", header, "-" * len(header)]
    for k, r in overhead["optimizers"].items():
        lines.append(f"{OPTIMIZERS[k]:38s}{_fmt(r['step_ms'], 10, '.2f')}"
                     f"{_fmt(r['step_time_ratio'], 9, '.3f', 'x')}"
                     f"{_fmt(r['cpu_ms_per_step'], 10, '.2f')}"
                     f"{_fmt(r['cpu_time_ratio'], 9, '.3f', 'x')}"
                     f"{_fmt(r['peak_memory_mib'], 10, '.0f')}")
    return lines


def format_table(results: dict) -> str:
    """The results of `benchmark` as text: one row a policy, then the optimizer overhead.

    Args:
        results: What `benchmark` returned.

    Returns:
        The tables `python -m tools.benchmark` prints, without a final newline.
    """
    lines = _title_lines(results) + _policy_lines(results)
    overhead = results["optimizer_overhead"]
    if overhead is None:
        return "\n".join(lines + ["Optimizer overhead: skipped (--nooptimizer_overhead)."])
    return "\n".join(lines + [""] + _overhead_lines(overhead))
