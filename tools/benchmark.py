"""Side-by-side training benchmark: float32 vs mixed_float16 vs mixed_bfloat16, any backend.

KERAS_BACKEND=jax python -m tools.benchmark --model=resnet50 [--batch_size=256 --json=r.json]
python -m tools.benchmark --model=transformer --hidden=256 --num_heads=4 --seq_len=128
python -m tools.benchmark --model_file=model.keras --nooptimizer_overhead

Trains the same model (same initial weights, same synthetic batch; see
`tools.benchmark_models`: resnet50, transformer (BERT-base), mlp, ...) under each
policy with a compiled step (`--jit_compile`, XLA on both backends) and prints,
side by side: examples/second and step time (medians over the repeats, after
warm-up), peak memory, activation memory per example (`tfmp.audit.
activation_bytes_per_example`: what decides how much larger a batch fits), the
final loss, on a GPU the largest batch that trains (doubling from the batch
size until out of memory, then bisecting to ~3%, in a fresh process per
policy), and their ratios to the float32 baseline (for speed, the median of the
per-repeat ratios). Each policy trains in its own spawned process, so that the
peak memory is its own: the GPU allocator's peak (TensorFlow with memory growth;
JAX with `XLA_PYTHON_CLIENT_PREALLOCATE=false`, so the processes share a GPU),
else the process' peak resident set size. The processes take turns, `steps`
steps each, the order reversed every other repeat, so slow drifts of the machine
hit every policy alike. Under JAX, TensorFlow is never imported.

The float32 baseline is the frameworks' default, which on Ampere and later GPUs
rounds matmul and convolution inputs to TF32: that row, `float32 (tf32)`, is
what the ratios use (it is what a user switching to mixed precision leaves).
`float32 (highest)` is also timed on such GPUs (TF32 off: strict float32). A
CPU has no TF32: there the one row is `float32` (the `float32_mode` field says
which). A second table, the cost of loss scaling: the same model under
mixed_float16 with the plain Adam, Keras' `LossScaleOptimizer` and tfmp's, as
ratios of step time to the plain one.

Published anchors (NVIDIA DeepLearningExamples, one GPU, XLA on, the mixed
batch usually twice the TF32 one): EfficientNet-B0 on A100, TF32 1209 -> AMP
3454 img/s (2.85x; TensorFlow2/Classification/ConvNets/efficientnet_v1);
BERT-large SQuAD fine-tuning on A100, TF32 43.9 -> AMP 134.2 seq/s (3.06x;
TensorFlow2/LanguageModeling/BERT); ResNet-50 2.60x on A100 (over TF32) and
3.08x on V100 (over float32; TensorFlow/Classification/ConvNets/resnet50v1.5).
On H100/H200 the dense 16-bit tensor-core peak is 2x the TF32 one. Targets on a
GPU: mixed >= 2x the TF32 throughput on ResNet-50 and the Transformer, <= 0.55x
the activation memory, tfmp's optimizer within 1.03x of the plain one. Here every
row trains the same batch (a doubled mixed batch, as NVIDIA's, would favour
mixed), and each step is one `train_on_batch` call, Python dispatch included.
`tools/gpu_benchmark.sh` runs the three models on a GPU machine under JAX.

Measure rather than assume: float16 is not always faster. CPUs without float16
arithmetic are usually slower with it, and on GPUs some kernels are too:
tensorflow/tensorflow#41715 reports a depthwise-convolution model at 120 ms/step
in float32 and 2000 ms/step under mixed precision (its backward pass).

A bad flag or argument prints one `error:` line on stderr and exits with status 2, before
anything runs; a failure during the benchmark, one `error:` line and status 1 (`tfmp.cli.run`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
from collections.abc import Sequence

from absl import flags

from tools import benchmark_models
from tools import benchmark_runner as runner
from tools.benchmark_runner import find_max_batch  # noqa: F401 (part of this tool's API)

FLAGS = flags.FLAGS

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


def _rows(measured: dict[str, dict], specs: dict[str, runner.Spec], steps: int) -> dict[str, dict]:
    """Medians and ratios to the first row."""
    base = measured[next(iter(measured))]
    rows = {}
    for n, m in measured.items():
        walls, cpus = [w for w, _ in m["times"]], [c for _, c in m["times"]]
        pairs = list(zip(m["times"], base["times"], strict=True))
        rows[n] = {
            "policy": specs[n].policy, "tf32": specs[n].tf32,
            "examples_per_second": specs[n].batch_size * steps / statistics.median(walls),
            "step_ms": 1000 * statistics.median(walls) / steps,
            "cpu_ms_per_step": 1000 * statistics.median(cpus) / steps, **m["final"],
            **{k: m["info"][k] for k in ("activation_bytes_per_example", "params")},
            "speedup": statistics.median(wb / w for (w, _), (wb, _) in pairs),
            "step_time_ratio": statistics.median(w / wb for (w, _), (wb, _) in pairs),
            "cpu_time_ratio": statistics.median(c / cb for (_, c), (_, cb) in pairs),
        }
    ref = rows[next(iter(rows))]
    for row in rows.values():
        row["memory_ratio"] = (row["peak_memory_mib"] / ref["peak_memory_mib"]
                               if row["peak_memory_mib"] and ref["peak_memory_mib"] else None)
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


def _check(*, policies, steps, repeats, warmup, max_batch_limit, model, model_file, sizes
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
        model: A `tools.benchmark_models.model_names()` name, on synthetic data
            (ignored when `model_file` is given).
        model_file: A `.keras` file, converted per policy with
            `tfmp.convert.apply_policy`, trained on random inputs and labels.
        policies: Policies to compare, `"float32"` first.
        batch_size: Examples per step (None: the model's default).
        steps: Steps per timed measurement.
        repeats: Timed measurements per row, interleaved.
        warmup: Untimed steps before the first measurement (compilation included).
        image_size, hidden, num_heads, seq_len, ff_dim, num_layers: The model's
            sizes (None: its defaults; see `tools.benchmark_models`).
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
    searched = max_batch_search and gpu
    max_batches = _max_batches(specs, max_batch_limit) if searched else {}
    base = next(iter(rows))
    for n, row in rows.items():
        row["max_batch_size"], row["max_batch_capped"] = max_batches.get(n, (None, None))
        row["max_batch_ratio"] = (row["max_batch_size"] / rows[base]["max_batch_size"]
                                  if row["max_batch_size"] and rows[base]["max_batch_size"]
                                  else None)
    overhead = None
    if optimizer_overhead:
        specs = {k: spec(name=k, policy="mixed_float16", optimizer=k) for k in OPTIMIZERS}
        overhead = {"policy": "mixed_float16", "optimizers": _rows(run(specs), specs, steps)}
    return {
        "config": {"model": os.path.basename(model_file) if model_file else model,
                   **config.sizes(), "batch_size": batch_size, "steps": steps,
                   "repeats": repeats, "warmup": warmup, "jit_compile": jit_compile,
                   "isolate": isolate, "seed": seed},
        "backend": runner.backend(), "device": device, "baseline": base,
        "float32_mode": "tf32" if tf32 else "float32 (no TF32 on a "
                        f"{'GPU before Ampere' if gpu else 'CPU'})",
        "max_batch_search": ("searched" + (" (not for float32 (highest): same memory as tf32)"
                                           if len(max_batches) < len(rows) else ""))
        if searched else "skipped: no GPU (on a CPU, memory is swapped or grows instead of "
        "running out)" if max_batch_search else "skipped: --nomax_batch_search",
        "policies": rows, "optimizer_overhead": overhead}


def _fmt(value, width: int, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-".rjust(width)
    return f"{value:{spec}}{suffix}".rjust(width)


_MEMORY_NOTES = {"process_peak_rss": "peak MiB: peak resident memory of the row's process "
                 "(the framework's own few hundred MiB included).",
                 "gpu_peak": "peak MiB: the GPU allocator's peak in the row's process.",
                 None: "peak MiB: not measured (all rows share one process)."}


def format_table(results: dict) -> str:
    """The results of `benchmark` as text: one row a policy, then the optimizer overhead."""
    c = results["config"]
    where = "one process per row" if c["isolate"] else "one process"
    sizes = ", ".join(f"{k} {c[k]}" for k in ("image_size", "hidden", "num_heads", "seq_len",
                                               "ff_dim", "num_layers") if k in c)
    lines = [f"{c['model']}{f' ({sizes})' if sizes else ''}: batch {c['batch_size']}, "
             f"{c['repeats']} interleaved repeats of {c['steps']} steps after {c['warmup']} "
             f"warm-up steps, jit_compile={c['jit_compile']}, {results['backend']} on "
             f"{results['device']} ({where}; medians)",
             f"float32 mode: {results['float32_mode']}; the ratios (x f32) are to "
             f"{results['baseline']!r}" + ("; 'float32 (highest)' is TF32 off (strict float32)"
                                           if "float32 (highest)" in results["policies"] else "")]
    header = (f"{'policy':18s}{'ex/s':>10s}{'x f32':>8s}{'step ms':>10s}{'cpu ms':>10s}"
              f"{'peak MiB':>10s}{'x f32':>8s}{'act KiB/ex':>12s}{'x f32':>8s}"
              f"{'max batch':>11s}{'x f32':>8s}{'final loss':>12s}")
    lines += [header, "-" * len(header)]
    for p, r in results["policies"].items():
        capped = ">=" if r["max_batch_capped"] else ""
        batch = f"{capped}{r['max_batch_size']}" if r["max_batch_size"] is not None else "-"
        lines.append(
            f"{p:18s}{_fmt(r['examples_per_second'], 10, '.1f')}"
            f"{_fmt(r['speedup'], 8, '.2f', 'x')}{_fmt(r['step_ms'], 10, '.1f')}"
            f"{_fmt(r['cpu_ms_per_step'], 10, '.1f')}{_fmt(r['peak_memory_mib'], 10, '.0f')}"
            f"{_fmt(r['memory_ratio'], 8, '.2f', 'x')}"
            f"{_fmt(r['activation_bytes_per_example'] / 1024, 12, '.1f')}"
            f"{_fmt(r['activation_memory_ratio'], 8, '.2f', 'x')}{batch:>11s}"
            f"{_fmt(r['max_batch_ratio'], 8, '.2f', 'x')}{_fmt(r['final_loss'], 12, '.4f')}")
    lines.append(_MEMORY_NOTES[next(iter(results["policies"].values()))["memory_kind"]])
    lines.append(f"Largest batch: {results['max_batch_search']}.")
    overhead = results["optimizer_overhead"]
    if overhead is None:
        return "\n".join(lines + ["Optimizer overhead: skipped (--nooptimizer_overhead)."])
    lines += ["", f"Loss-scaling overhead, {overhead['policy']}, same model and batch "
              "(x plain: median of per-repeat step-time ratios)"]
    header = (f"{'optimizer':38s}{'step ms':>10s}{'x plain':>9s}{'cpu ms':>10s}{'x plain':>9s}"
              f"{'peak MiB':>10s}")
    lines += [header, "-" * len(header)]
    for k, r in overhead["optimizers"].items():
        lines.append(f"{OPTIMIZERS[k]:38s}{_fmt(r['step_ms'], 10, '.2f')}"
                     f"{_fmt(r['step_time_ratio'], 9, '.3f', 'x')}"
                     f"{_fmt(r['cpu_ms_per_step'], 10, '.2f')}"
                     f"{_fmt(r['cpu_time_ratio'], 9, '.3f', 'x')}"
                     f"{_fmt(r['peak_memory_mib'], 10, '.0f')}")
    return "\n".join(lines)


def _define_flags() -> None:
    """Defines the tool's flags, only when it runs as a program.

    Importing the module (tests, spawned workers) then registers no flag that could clash with
    another tool's or recipe's flags in the same process.
    """
    flags.DEFINE_string(
        "model", "resnet_mini", "Model on synthetic data: resnet50, transformer (BERT-base "
        "encoder), mlp, resnet_mini, mobilenet_v2 or efficientnet_b0 (tools.benchmark_models).")
    flags.DEFINE_string(
        "model_file", None, "A `.keras` model (loaded with safe_mode=True) instead of --model; "
        "converted with tfmp.convert.apply_policy and trained on random inputs.")
    flags.DEFINE_list("policies", list(POLICIES), "Policies to compare (float32 first).")
    flags.DEFINE_integer("batch_size", None, "Examples per step (default: the model's).")
    flags.DEFINE_integer("steps", 10, "Training steps per measurement.")
    flags.DEFINE_integer("repeats", 5, "Interleaved measurements (medians are reported).")
    flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation, allocation).")
    for name, help_ in (("image_size", "Image side (default 224; resnet_mini 32)."),
                        ("hidden", "Width of transformer (768) or mlp (4096)."),
                        ("num_heads", "Attention heads of transformer (12)."),
                        ("seq_len", "Tokens per transformer example (512)."),
                        ("ff_dim", "Feed-forward width of transformer (4 * hidden)."),
                        ("num_layers", "Blocks of transformer (12) or layers of mlp (8).")):
        flags.DEFINE_integer(name, None, help_)
    flags.DEFINE_bool("jit_compile", True, "XLA-compile the train step.")
    flags.DEFINE_bool("strict_float32", True,
                      "On a GPU with TF32, also time float32 with TF32 off.")
    flags.DEFINE_bool("optimizer_overhead", True, "Also time plain Adam vs Keras' and tfmp's "
                      "LossScaleOptimizer under mixed_float16.")
    flags.DEFINE_bool("isolate", True, "One process per row (needed for per-row peak memory).")
    flags.DEFINE_bool("max_batch_search", True, "On a GPU, search the largest batch.")
    flags.DEFINE_integer("max_batch_limit", 65536, "Largest batch tried.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.DEFINE_string("json", None, "Also write the results to this JSON file.")


def main(argv):
    from tfmp import cli

    cli.check_no_arguments(argv)
    if FLAGS.json:
        cli.check_output_file(FLAGS.json, argument="json")  # now, not after the benchmark
    names = ("model", "model_file", "policies", "batch_size", "steps", "repeats", "warmup",
             "image_size", "hidden", "num_heads", "seq_len", "ff_dim", "num_layers",
             "jit_compile", "strict_float32", "optimizer_overhead", "isolate",
             "max_batch_search", "max_batch_limit", "progress")
    results = benchmark(**{name: FLAGS[name].value for name in names})
    print(format_table(results), flush=True)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    _define_flags()
    from tfmp import cli

    cli.run(main)
