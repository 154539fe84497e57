"""Cost of `tfmp.callbacks.LossScaleMonitor` in `fit`: no monitor, a read per step, the default.

Fits the same small Dense model under `mixed_float16` with tfmp's
LossScaleOptimizer four ways, interleaved in one process: without the
monitor; with a callback that does nothing per batch (any batch hook makes
Keras copy the loss to the host after every call, the part of the cost that
is not the monitor's); with `check_every=1` (the counters also copied from the
device after every step, as the monitor did before `check_every`); and with
the default (`check_every=None`: a read at the epoch end and where the stop
check could be due). Prints each variant's wall time per `fit` as a ratio to the run without a
monitor: the median of per-repeat ratios. On a CPU a device read costs little;
the figure for a GPU, where each read stalls the pipeline, has to be measured
there.

    python -m tools.bench_monitor --steps=200 --repeats=7 [--steps_per_execution=4]

A bad flag or argument prints one `error:` line and exits with status 2 (`tfmp.cli.run`).
"""

from __future__ import annotations

import statistics
import time

from absl import flags

VARIANTS = ("no_monitor", "empty_batch_hook", "check_every=1", "default")


def _callbacks(variant: str) -> list:
    """The callbacks of one variant: `empty_batch_hook` is a callback that does nothing
    per batch but, like any such hook, makes Keras convert the logs to floats after
    every call (a device read of the loss) instead of in a background thread."""
    import keras

    import tfmp

    return {
        "no_monitor": [],
        "empty_batch_hook": [keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: None)],
        "check_every=1": [tfmp.callbacks.LossScaleMonitor(check_every=1)],
        "default": [tfmp.callbacks.LossScaleMonitor()],
    }[variant]


def benchmark(*, steps: int = 200, batch_size: int = 64, units: int = 64, layers: int = 4,
              repeats: int = 7, steps_per_execution: int = 1, seed: int = 0) -> dict:
    """Measures `fit` with each monitor variant relative to `fit` without one.

    Args:
        steps: Training steps per `fit` (one epoch).
        batch_size: Examples per step.
        units: Units per Dense layer.
        layers: Hidden Dense layers.
        repeats: Interleaved measurements of every variant (alternating order).
        steps_per_execution: Keras' `steps_per_execution` for every variant.
        seed: Seed for weights and data.

    Returns:
        `{"settings", "backend", "device", "no_monitor_ms_per_step", "ratios"}`:
        `settings` the arguments, `ratios` `{variant: ratio}` for every variant
        but `no_monitor`, each the median over repeats of the variant's wall
        time per `fit` divided by that of the run without a monitor.

    Raises:
        tfmp.cli.UsageError: (a `ValueError`) for a size that is not an integer >= 1,
            or `steps` that `steps_per_execution` does not divide.
    """
    import keras
    import numpy as np

    import tfmp
    from tfmp import _checks

    for name, value in (("steps", steps), ("batch_size", batch_size), ("units", units),
                        ("layers", layers), ("repeats", repeats),
                        ("steps_per_execution", steps_per_execution)):
        with tfmp.cli.usage_errors():
            _checks.integer(name, value)
    if steps % steps_per_execution:
        raise tfmp.cli.UsageError(
            "`steps` must be a multiple of `steps_per_execution` (Keras runs whole "
            f"executions). Received: steps={steps}, steps_per_execution={steps_per_execution}")

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(steps * batch_size, units)).astype("float32")
    y = rng.normal(size=(steps * batch_size, 1)).astype("float32")

    def build():
        keras.utils.set_random_seed(seed)
        with tfmp.policy_scope("mixed_float16"):
            model = keras.Sequential(
                [keras.Input((units,))]
                + [keras.layers.Dense(units, activation="relu") for _ in range(layers)]
                + [keras.layers.Dense(1, dtype="float32")])
            model.compile(optimizer=tfmp.LossScaleOptimizer(keras.optimizers.SGD(1e-3)),
                          loss="mse", steps_per_execution=steps_per_execution)
        return model

    def fit(variant, n=None):
        start = time.perf_counter()
        models[variant].fit(x[:n], y[:n], batch_size=batch_size, epochs=1, shuffle=False,
                            verbose=0, callbacks=_callbacks(variant))
        return time.perf_counter() - start

    models = {variant: build() for variant in VARIANTS}
    for variant in VARIANTS:  # trace and warm up (the monitor retraces once to guard state)
        fit(variant, n=2 * steps_per_execution * batch_size)
    times = {variant: [] for variant in VARIANTS}
    for r in range(repeats):
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            times[variant].append(fit(variant))
    base = times["no_monitor"]
    from tfmp import benchmark_runner  # after training: its JAX allocator setting is moot

    return {
        "settings": {"steps": steps, "batch_size": batch_size, "units": units,
                     "layers": layers, "repeats": repeats,
                     "steps_per_execution": steps_per_execution},
        "backend": keras.backend.backend(),
        "device": benchmark_runner.device_name(),
        "no_monitor_ms_per_step": 1000 * statistics.median(base) / steps,
        "ratios": {variant: statistics.median(
            t / b for t, b in zip(times[variant], base, strict=True)) for variant in VARIANTS[1:]},
    }


def format_results(results: dict) -> str:
    """The lines `main` prints for `benchmark`'s results."""
    s = results["settings"]
    lines = [
        f"LossScaleMonitor cost in fit: {results['backend']} backend on {results['device']}, "
        f"mixed_float16, {s['layers']}x Dense({s['units']}), batch {s['batch_size']}, "
        f"{s['steps']} steps per fit, steps_per_execution={s['steps_per_execution']}",
        f"median of {s['repeats']} interleaved repeats (wall time per fit, ratio to no "
        "monitor)",
        f"{'no monitor':32s}{results['no_monitor_ms_per_step']:10.3f} ms/step",
    ]
    for variant, ratio in results["ratios"].items():
        lines.append(f"{variant + ' / no monitor':32s}{ratio:10.3f}")
    return "\n".join(lines)


def _define_flags() -> None:
    """The flags of `main` (defined only when run as a program, so tests can import this)."""
    flags.DEFINE_integer("steps", 200, "Training steps per fit.")
    flags.DEFINE_integer("batch_size", 64, "Examples per step.")
    flags.DEFINE_integer("units", 64, "Units per Dense layer.")
    flags.DEFINE_integer("layers", 4, "Hidden Dense layers.")
    flags.DEFINE_integer("repeats", 7, "Interleaved repeats (the median is reported).")
    flags.DEFINE_integer("steps_per_execution", 1, "Keras' steps_per_execution.")


def main(argv):
    from tfmp import cli

    cli.check_no_arguments(argv)
    values = {name: flags.FLAGS[name].value for name in (
        "steps", "batch_size", "units", "layers", "repeats", "steps_per_execution")}
    print(format_results(benchmark(**values)))


if __name__ == "__main__":
    from tfmp import cli

    _define_flags()
    cli.run(main)
