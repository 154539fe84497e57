"""Side-by-side training benchmark: float32 vs mixed_float16 vs mixed_bfloat16.

python -m tools.benchmark --model=resnet_mini [--batch_size=32 --steps=10 --repeats=5]
python -m tools.benchmark --model_file=model.keras --json=results.json

Trains the same model (same initial weights, same synthetic batch) under each
policy and prints, side by side: examples/second and step time (medians over
the repeats, after warm-up), peak memory, the final loss, activation memory per
example, and their ratios to float32 (for speed, the median of the per-repeat
ratios). Each policy trains in its own process (multiprocessing, spawn), so
that the peak memory is that policy's alone: the peak resident set size
(`ru_maxrss`) of its process on a CPU, TensorFlow's peak GPU allocation on a
GPU (with memory growth, so the processes share the GPU). The processes are
driven in turn, `steps` steps each, the order reversed every other repeat, so
slow drifts of the machine hit every policy alike.

Activation memory per example is the sum over layers of `prod(output_shape[1:])
* itemsize` (`tfmp.audit.activation_bytes_per_example`): what decides how much
larger a batch fits. On a GPU the tool also searches for the largest batch that
trains (doubling from `--batch_size` until TensorFlow raises
ResourceExhaustedError, then bisecting to ~3%), in a fresh process per policy;
on a CPU the search is skipped.

Measure rather than assume: float16 is not always faster. On CPUs without
float16 arithmetic it is usually slower, and on GPUs some kernels are too:
tensorflow/tensorflow#41715 reports a depthwise-convolution model at 120
ms/step in float32 and 2000 ms/step under mixed precision (its backward pass).

A bad flag or argument prints one `error:` line on stderr and exits with status 2, before
anything runs; a failure during the benchmark, one `error:` line and status 1 (`tfmp.cli.run`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
FLAGS = flags.FLAGS

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
TEXT_MODEL = "transformer"
_MAX_BATCH_TOLERANCE = 1 / 32



@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything a worker needs to build, compile and feed one policy's model."""

    policy: str
    model: str | None
    model_file: str | None
    batch_size: int
    image_size: int
    seq_len: int
    warmup: int
    jit_compile: bool
    seed: int
    learning_rate: float = 1e-3
    loss: str = "sparse_categorical_crossentropy"


def _device() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU"
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    return f"GPU ({name}){f' x{len(gpus)}' if len(gpus) > 1 else ''}"


def _build(spec: _Spec):
    """The model (compiled) and one fixed batch `(x, y)` as tensors."""
    import keras
    import numpy as np

    import tfmp
    from tfmp import cli, convert, data, models, training

    keras.utils.set_random_seed(spec.seed)
    if spec.model_file is not None:
        loaded = cli.load_keras_file(spec.model_file, argument="model_file")
        model = convert.apply_policy(loaded, spec.policy)
        rng = np.random.default_rng(spec.seed)
        xs = []
        for t in model.inputs:
            shape = (spec.batch_size,) + tuple(t.shape[1:])
            if any(d is None for d in shape):
                raise ValueError(f"`model_file` input {t.name!r} has an unknown dimension "
                                 f"{tuple(t.shape)}; the benchmark needs static shapes.")
            if keras.backend.is_float_dtype(t.dtype):
                xs.append(rng.uniform(size=shape).astype(t.dtype))
            else:
                xs.append(rng.integers(0, 2, size=shape).astype(t.dtype))
        if len(model.outputs) != 1:
            raise ValueError(f"`model_file` must have one output; it has {len(model.outputs)}.")
        classes = int(model.outputs[0].shape[-1] or 1)
        x = xs[0] if len(xs) == 1 else xs
        y = rng.integers(0, classes, size=(spec.batch_size,)).astype("int32")
    else:
        with tfmp.policy_scope(spec.policy):
            if spec.model == TEXT_MODEL:
                model = models.text_classifier(spec.seq_len, 1000, 2)
            else:
                size = spec.image_size
                model = models.image_classifier(spec.model, (size, size, 3), 10)
        if spec.model == TEXT_MODEL:
            x, y = data.synthetic_text(spec.batch_size, spec.seq_len, 1000, 2, seed=spec.seed)
        else:
            x, y = data.synthetic_images(spec.batch_size, spec.image_size, 10, seed=spec.seed)
    optimizer = training.make_optimizer(spec.learning_rate, spec.policy)
    model.compile(optimizer=optimizer, loss=spec.loss, jit_compile=spec.jit_compile)
    to_tensor = keras.ops.convert_to_tensor
    x = [to_tensor(v) for v in x] if isinstance(x, list) else to_tensor(x)
    return model, x, to_tensor(y)


def _peak_memory_mib(isolated: bool) -> tuple[float | None, str | None]:
    import tensorflow as tf

    if not isolated:
        return None, None  # Every policy shares this process' memory.
    if tf.config.list_physical_devices("GPU"):
        return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20, "gpu_peak"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


class _Runner:
    """One policy's model, trained `steps` steps at a time."""

    def __init__(self, spec: _Spec, isolated: bool):
        from tfmp import audit

        self.spec, self.isolated = spec, isolated
        self.model, self.x, self.y = _build(spec)
        self.loss = float("nan")
        for _ in range(spec.warmup):
            self.loss = float(self.model.train_on_batch(self.x, self.y))
        self.info = {
            "activation_bytes_per_example": audit.activation_bytes_per_example(self.model),
            "params": int(self.model.count_params()),
            "device": _device(),
        }

    def run(self, steps: int) -> tuple[float, float, float]:
        """`(wall seconds, process CPU seconds, last loss)` of `steps` training steps."""
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(steps):
            loss = self.model.train_on_batch(self.x, self.y)  # Returns a number: synchronous.
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        self.loss = float(loss)
        return wall, cpu, self.loss

    def finish(self) -> dict:
        peak, kind = _peak_memory_mib(self.isolated)
        return {"final_loss": self.loss, "peak_memory_mib": peak, "memory_kind": kind}


def find_max_batch(fits: Callable[[int], bool], start: int, limit: int,
                   tolerance: float = _MAX_BATCH_TOLERANCE) -> tuple[int, bool]:
    """Largest batch size for which `fits(batch)` holds, by doubling then bisection.

    Assumes `fits` is monotone (true up to some size, false above).

    Args:
        fits: Whether a batch of that size trains (e.g. no out-of-memory error).
        start: The first size tried.
        limit: The largest size tried.
        tolerance: Bisection stops when `hi - lo <= max(1, hi * tolerance)`;
            0 finds the exact boundary.

    Returns:
        `(size, capped)`: the largest size seen to fit (0 if none) and whether
        the search stopped at `limit` with everything fitting.

    Example:

        >>> find_max_batch(lambda b: b <= 1000, 32, 65536, tolerance=0)
        (1000, False)
    """
    lo, b = 0, max(1, min(start, limit))
    while fits(b):
        lo = b
        if b >= limit:
            return lo, True
        b = min(2 * b, limit)
    hi = b
    while hi - lo > max(1, int(hi * tolerance)):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, False


def _search_max_batch(spec: _Spec, limit: int) -> tuple[int, bool]:
    """In this (fresh) process: the largest batch of `spec`'s model that trains on the GPU."""
    import tensorflow as tf

    model, x, y = _build(spec)

    def fits(batch: int) -> bool:
        reps = -(-batch // spec.batch_size)
        try:
            xb = tf.repeat(x, reps, axis=0)[:batch] if not isinstance(x, list) else [
                tf.repeat(v, reps, axis=0)[:batch] for v in x]
            yb = tf.repeat(y, reps, axis=0)[:batch]
            for _ in range(2):
                model.train_on_batch(xb, yb)
            return True
        except tf.errors.ResourceExhaustedError:
            return False

    return find_max_batch(fits, spec.batch_size, limit)


def _worker(conn, spec: _Spec, task: str, limit: int) -> None:
    """A spawned process: `task` "train" serves run/finish requests; "max_batch" searches."""
    try:
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)  # The processes share the GPU.
        if task == "max_batch":
            conn.send(("ok", _search_max_batch(spec, limit)))
            return
        runner = _Runner(spec, isolated=True)
        conn.send(("ok", runner.info))
        while True:
            command, steps = conn.recv()
            if command == "run":
                conn.send(("ok", runner.run(steps)))
            else:
                conn.send(("ok", runner.finish()))
                return
    except Exception as e:  # Reported by the parent, with the policy.
        conn.send(("error", f"{type(e).__name__}: {' '.join(str(e).split())}"))
    finally:
        conn.close()


class _Process:
    """A `_Runner` in a spawned process, with the same methods."""

    def __init__(self, spec: _Spec, task: str = "train", limit: int = 0):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.policy = spec.policy
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, spec, task, limit),
                                       daemon=True)
        self.process.start()
        child.close()

    def receive(self):
        while not self.conn.poll(1.0):
            if not self.process.is_alive():
                raise RuntimeError(f"the {self.policy} worker process died "
                                   f"(exit code {self.process.exitcode}).")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"{self.policy}: {value}")
        return value

    def run(self, steps: int):
        self.conn.send(("run", steps))
        return self.receive()

    def finish(self) -> dict:
        self.conn.send(("finish", 0))
        result = self.receive()
        self.close()
        return result

    def close(self) -> None:
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()


def _check(*, model, model_file, policies, batch_size, steps, repeats, warmup, image_size,
           seq_len, max_batch_limit) -> None:
    """Raises `tfmp.cli.UsageError` (a `ValueError`) for a bad argument of `benchmark`."""
    from tfmp import cli, models

    with cli.usage_errors():
        for name, value, least in (("batch_size", batch_size, 1), ("steps", steps, 1),
                                   ("repeats", repeats, 1), ("warmup", warmup, 0),
                                   ("image_size", image_size, 8), ("seq_len", seq_len, 1),
                                   ("max_batch_limit", max_batch_limit, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(
                    f"`{name}` must be an integer >= {least}. Received: {name}={value!r}")
        unknown = [p for p in policies if p not in POLICIES]
        if (unknown or not policies or policies[0] != "float32"
                or len(set(policies)) != len(policies)):
            raise ValueError(
                f"`policies` must list distinct policies from {', '.join(POLICIES)}, float32 "
                f"first (the ratios are to float32). Received: policies={list(policies)}")
        if model_file is not None:
            cli.check_keras_file(model_file, argument="model_file")
        elif model != TEXT_MODEL:
            if model not in models.IMAGE_MODELS:
                raise ValueError(
                    f"Unknown `model`: {model!r}. Expected one of: "
                    f"{', '.join(models.IMAGE_MODELS + (TEXT_MODEL,))}.")
            models.validate_image_model(model, image_size=image_size)


def benchmark(*, model: str = "resnet_mini", model_file: str | None = None,
              policies: Sequence[str] = POLICIES, batch_size: int = 32, steps: int = 10,
              repeats: int = 5, warmup: int = 3, image_size: int = 32, seq_len: int = 64,
              jit_compile: bool = False, isolate: bool = True, max_batch_search: bool = True,
              max_batch_limit: int = 65536, seed: int = 0, progress: bool = True) -> dict:
    """Trains one model under each policy, interleaved, and compares them to float32.

    Args:
        model: A `tfmp.models` image classifier name or `"transformer"`, on
            synthetic data (ignored when `model_file` is given).
        model_file: A `.keras` file, converted per policy with
            `tfmp.convert.apply_policy`, trained on random inputs and labels.
        policies: Policies to compare, `"float32"` first.
        batch_size: Examples per step.
        steps: Steps per timed measurement.
        repeats: Timed measurements per policy, interleaved.
        warmup: Untimed steps before the first measurement.
        image_size: Side of the synthetic images.
        seq_len: Tokens per synthetic text example.
        jit_compile: XLA-compile the train step.
        isolate: One process per policy (peak memory per policy); False runs
            all policies in this process (quicker to start; peak memory is then
            None, as the policies share the process' memory).
        max_batch_search: On a GPU, search the largest batch per policy.
        max_batch_limit: The largest batch the search tries.
        seed: Seed of the initial weights and the batch.
        progress: Show a `keras.utils.Progbar`.

    Returns:
        `{"config": {...}, "device": str, "max_batch_search": str, "policies":
        {policy: {...}}}`; each policy has `examples_per_second` (from the
        median measurement time), `step_ms`, `cpu_ms_per_step` (process CPU
        time), `peak_memory_mib` (None when not measured), `memory_kind`,
        `final_loss`, `activation_bytes_per_example`, `params`,
        `max_batch_size` (None when not searched), `max_batch_capped`, and the
        ratios to float32: `speedup` (median of per-repeat examples/second
        ratios), `step_time_ratio`, `memory_ratio`, `activation_memory_ratio`
        and `max_batch_ratio`.

    Raises:
        tfmp.cli.UsageError: (a `ValueError`) for a bad argument, before anything runs.

    Example:

        results = benchmark(model="resnet_mini", batch_size=16, steps=2, repeats=2)
        results["policies"]["mixed_float16"]["activation_memory_ratio"]   # ~0.5
    """
    policies = tuple(policies)
    _check(model=model, model_file=model_file, policies=policies, batch_size=batch_size,
           steps=steps, repeats=repeats, warmup=warmup, image_size=image_size, seq_len=seq_len,
           max_batch_limit=max_batch_limit)
    import keras

    specs = {p: _Spec(policy=p, model=None if model_file else model, model_file=model_file,
                      batch_size=batch_size, image_size=image_size, seq_len=seq_len,
                      warmup=warmup, jit_compile=jit_compile, seed=seed) for p in policies}
    bar = keras.utils.Progbar(len(policies) * (repeats + 1), verbose=1 if progress else 0,
                              stateful_metrics=[f"{p} ex/s" for p in policies])
    done = 0
    runners: dict[str, Any] = {}
    try:
        for p in policies:  # Start the processes together: their imports overlap.
            runners[p] = _Process(specs[p]) if isolate else _Runner(specs[p], isolated=False)
        infos = {}
        for p in policies:
            infos[p] = runners[p].receive() if isolate else runners[p].info
            done += 1
            bar.update(done)
        times = {p: [] for p in policies}
        for r in range(repeats):
            for p in policies if r % 2 == 0 else policies[::-1]:
                wall, cpu, _ = runners[p].run(steps)
                times[p].append((wall, cpu))
                done += 1
                bar.update(done, values=[(f"{p} ex/s", batch_size * steps / wall)])
        finals = {p: runners[p].finish() for p in policies}
    finally:
        for runner in runners.values():
            if isinstance(runner, _Process):
                runner.close()
    device = infos[policies[0]]["device"]
    searched = max_batch_search and device.startswith("GPU")
    note = "searched" if searched else (
        "skipped: no GPU (on a CPU, memory is swapped or grows instead of running out)"
        if max_batch_search else "skipped: --nomax_batch_search")
    max_batches = {}
    if searched:
        for p in policies:  # One at a time, each in a fresh process, alone on the GPU.
            searcher = _Process(specs[p], task="max_batch", limit=max_batch_limit)
            try:
                max_batches[p] = searcher.receive()
            finally:
                searcher.close()
    results = {}
    base = policies[0]
    for p in policies:
        walls = [w for w, _ in times[p]]
        results[p] = {
            "examples_per_second": batch_size * steps / statistics.median(walls),
            "step_ms": 1000 * statistics.median(walls) / steps,
            "cpu_ms_per_step": 1000 * statistics.median(c for _, c in times[p]) / steps,
            **finals[p],
            **{k: infos[p][k] for k in ("activation_bytes_per_example", "params")},
            "max_batch_size": max_batches[p][0] if p in max_batches else None,
            "max_batch_capped": max_batches[p][1] if p in max_batches else None,
            "speedup": statistics.median(
                wb / w for (w, _), (wb, _) in zip(times[p], times[base], strict=True)),
            "step_time_ratio": statistics.median(
                w / wb for (w, _), (wb, _) in zip(times[p], times[base], strict=True)),
        }
    for p in policies:
        row, ref = results[p], results[base]
        row["memory_ratio"] = (row["peak_memory_mib"] / ref["peak_memory_mib"]
                               if row["peak_memory_mib"] and ref["peak_memory_mib"] else None)
        row["activation_memory_ratio"] = (row["activation_bytes_per_example"]
                                          / ref["activation_bytes_per_example"])
        row["max_batch_ratio"] = (row["max_batch_size"] / ref["max_batch_size"]
                                  if row["max_batch_size"] and ref["max_batch_size"] else None)
    config = {"model": os.path.basename(model_file) if model_file else model,
              "batch_size": batch_size, "steps": steps, "repeats": repeats, "warmup": warmup,
              "jit_compile": jit_compile, "isolate": isolate, "seed": seed,
              "image_size": image_size, "seq_len": seq_len}
    return {"config": config, "device": device, "max_batch_search": note, "policies": results}


def _fmt(value, width: int, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-".rjust(width)
    return f"{value:{spec}}{suffix}".rjust(width)


def format_table(results: dict) -> str:
    """The results of `benchmark` as a text table, one row a policy."""
    c = results["config"]
    where = "one process per policy" if c["isolate"] else "one process"
    lines = [f"{c['model']}: batch {c['batch_size']}, {c['repeats']} interleaved repeats of "
             f"{c['steps']} steps after {c['warmup']} warm-up steps, {results['device']} "
             f"({where}; medians)"]
    header = (f"{'policy':16s}{'ex/s':>10s}{'x f32':>8s}{'step ms':>10s}{'cpu ms':>10s}"
              f"{'peak MiB':>10s}{'x f32':>8s}{'act KiB/ex':>12s}{'x f32':>8s}"
              f"{'max batch':>11s}{'x f32':>8s}{'final loss':>12s}")
    lines += [header, "-" * len(header)]
    for p, r in results["policies"].items():
        capped = ">=" if r["max_batch_capped"] else ""
        batch = f"{capped}{r['max_batch_size']}" if r["max_batch_size"] is not None else "-"
        lines.append(
            f"{p:16s}{_fmt(r['examples_per_second'], 10, '.1f')}"
            f"{_fmt(r['speedup'], 8, '.2f', 'x')}{_fmt(r['step_ms'], 10, '.1f')}"
            f"{_fmt(r['cpu_ms_per_step'], 10, '.1f')}{_fmt(r['peak_memory_mib'], 10, '.0f')}"
            f"{_fmt(r['memory_ratio'], 8, '.2f', 'x')}"
            f"{_fmt(r['activation_bytes_per_example'] / 1024, 12, '.1f')}"
            f"{_fmt(r['activation_memory_ratio'], 8, '.2f', 'x')}{batch:>11s}"
            f"{_fmt(r['max_batch_ratio'], 8, '.2f', 'x')}{_fmt(r['final_loss'], 12, '.4f')}")
    kind = next(iter(results["policies"].values()))["memory_kind"]
    lines.append({"process_peak_rss": "peak MiB: peak resident memory of the policy's process "
                  "(TensorFlow's own ~0.5-1 GiB included).",
                  "gpu_peak": "peak MiB: TensorFlow's peak GPU allocation in the policy's process.",
                  None: "peak MiB: not measured (all policies share one process)."}[kind])
    lines.append(f"Largest batch: {results['max_batch_search']}.")
    return "\n".join(lines)


def _define_flags() -> None:
    """Defines the tool's flags, only when it runs as a program.

    Importing the module (tests, spawned workers) then registers no flag that could clash with
    another tool's or recipe's flags in the same process.
    """
    flags.DEFINE_string(
        "model", "resnet_mini", "tfmp.models model on synthetic data: resnet_mini, mobilenet_v2, "
        "resnet50, efficientnet_b0 (32x32 images by default) or transformer (text).")
    flags.DEFINE_string(
        "model_file", None, "A `.keras` model (loaded with safe_mode=True) instead of --model; "
        "converted with tfmp.convert.apply_policy and trained on random inputs.")
    flags.DEFINE_list("policies", list(POLICIES), "Policies to compare (float32 first).")
    flags.DEFINE_integer("batch_size", 32, "Examples per step.")
    flags.DEFINE_integer("steps", 10, "Training steps per measurement.")
    flags.DEFINE_integer("repeats", 5, "Interleaved measurements (medians are reported).")
    flags.DEFINE_integer("warmup", 3, "Untimed steps first (tracing, allocation).")
    flags.DEFINE_integer("image_size", 32, "Side of the synthetic images.")
    flags.DEFINE_integer("seq_len", 64, "Tokens per synthetic text example.")
    flags.DEFINE_bool("jit_compile", False, "XLA-compile the train step.")
    flags.DEFINE_bool(
        "isolate", True, "One process per policy (needed for per-policy peak memory).")
    flags.DEFINE_bool("max_batch_search", True, "On a GPU, search the largest batch.")
    flags.DEFINE_integer("max_batch_limit", 65536, "Largest batch tried.")
    flags.DEFINE_string("json", None, "Also write the results to this JSON file.")


def main(argv):
    from tfmp import cli

    cli.check_no_arguments(argv)
    if FLAGS.json:
        cli.check_output_file(FLAGS.json, argument="json")  # now, not after the benchmark
    results = benchmark(
        model=FLAGS.model, model_file=FLAGS.model_file, policies=FLAGS.policies,
        batch_size=FLAGS.batch_size, steps=FLAGS.steps, repeats=FLAGS.repeats,
        warmup=FLAGS.warmup, image_size=FLAGS.image_size, seq_len=FLAGS.seq_len,
        jit_compile=FLAGS.jit_compile, isolate=FLAGS.isolate,
        max_batch_search=FLAGS.max_batch_search, max_batch_limit=FLAGS.max_batch_limit)
    print(format_table(results))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    _define_flags()
    from tfmp import cli

    cli.run(main)
