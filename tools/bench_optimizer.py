"""Overhead of loss scaling: plain optimizer vs Keras' and tfmp's LossScaleOptimizer.

Trains the same deep, narrow Dense model (a worst case: per-variable op
overhead dominates) under `mixed_float16` with each optimizer, with and without
`jit_compile`, interleaved in one process, and prints each optimizer's cost as
a ratio to the plain inner optimizer: the median of per-repeat ratios of
process CPU time (steadier than wall time on a shared machine).

    python -m tools.bench_optimizer --repeats=15 --steps=20 [--json=results.json]

A bad flag or argument prints one `error:` line and exits with status 2 (`tfmp.cli.run`).
"""

from __future__ import annotations

import json
import statistics
import time

from absl import flags

_LAYERS = flags.DEFINE_integer("layers", 40, "Dense layers in the model.")
_UNITS = flags.DEFINE_integer("units", 64, "Units per layer.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_STEPS = flags.DEFINE_integer("steps", 20, "Training steps per measurement.")
_REPEATS = flags.DEFINE_integer("repeats", 15, "Interleaved repeats (the median is reported).")
_JSON = flags.DEFINE_string("json", None, "Also write the results to this JSON file.")

OPTIMIZERS = ("plain", "keras", "tfmp")


def benchmark(*, layers: int = 40, units: int = 64, batch_size: int = 64, steps: int = 20,
              repeats: int = 15, seed: int = 0) -> dict:
    """Measures the step cost of each optimizer relative to the plain one.

    Args:
        layers: Number of Dense layers.
        units: Units per Dense layer.
        batch_size: Examples per step.
        steps: Steps timed per measurement.
        repeats: Interleaved measurements of every variant.
        seed: Seed for weights and data.

    Returns:
        `{"jit_compile=False": {"keras": ratio, "tfmp": ratio, "plain_ms": ms}, ...}`,
        ratios being medians over repeats of CPU time / plain CPU time.

    Raises:
        tfmp.cli.UsageError: (a `ValueError`) for a size that is not an integer >= 1.
    """
    import keras
    import numpy as np

    import tfmp
    from tfmp import _checks

    for name, value in (("layers", layers), ("units", units), ("batch_size", batch_size),
                        ("steps", steps), ("repeats", repeats)):
        with tfmp.cli.usage_errors():
            _checks.integer(name, value)

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch_size, units)).astype("float32")
    y = rng.normal(size=(batch_size, 1)).astype("float32")

    def build(kind: str, jit: bool):
        keras.utils.set_random_seed(seed)
        with tfmp.policy_scope("mixed_float16"):
            model = keras.Sequential(
                [keras.Input((units,))]
                + [keras.layers.Dense(units, activation="relu") for _ in range(layers)]
                + [keras.layers.Dense(1, dtype="float32")]
            )
            inner = keras.optimizers.Adam(1e-4)
            optimizer = {
                "plain": inner,
                "keras": keras.optimizers.LossScaleOptimizer(inner) if kind == "keras" else None,
                "tfmp": tfmp.LossScaleOptimizer(inner) if kind == "tfmp" else None,
            }[kind]
            model.compile(optimizer=optimizer, loss="mse", jit_compile=jit, auto_scale_loss=False)
        for _ in range(3):  # trace, compile and warm up
            model.train_on_batch(x, y)
        return model

    results = {}
    for jit in (False, True):
        models = {kind: build(kind, jit) for kind in OPTIMIZERS}
        ratios = {kind: [] for kind in OPTIMIZERS[1:]}
        plain_times = []
        for r in range(repeats):
            order = OPTIMIZERS if r % 2 == 0 else OPTIMIZERS[::-1]
            times = {}
            for kind in order:
                start = time.process_time()
                for _ in range(steps):
                    models[kind].train_on_batch(x, y)
                times[kind] = time.process_time() - start
            plain_times.append(times["plain"])
            for kind in ratios:
                ratios[kind].append(times[kind] / times["plain"])
        results[f"jit_compile={jit}"] = {
            **{kind: statistics.median(values) for kind, values in ratios.items()},
            "plain_ms_per_step": 1000 * statistics.median(plain_times) / steps,
        }
    return results


def main(argv):
    from tfmp import cli

    cli.check_no_arguments(argv)
    if _JSON.value:
        cli.check_output_file(_JSON.value, argument="json")  # now, not after the benchmark
    results = benchmark(layers=_LAYERS.value, units=_UNITS.value, batch_size=_BATCH.value,
                        steps=_STEPS.value, repeats=_REPEATS.value)
    print(f"{_LAYERS.value}x Dense({_UNITS.value}), batch {_BATCH.value}, mixed_float16, "
          f"median of {_REPEATS.value} interleaved repeats of {_STEPS.value} steps (CPU time)")
    print(f"{'':20s}{'plain ms/step':>15s}{'keras / plain':>15s}{'tfmp / plain':>15s}"
          f"{'tfmp / keras':>15s}")
    for mode, r in results.items():
        print(f"{mode:20s}{r['plain_ms_per_step']:15.2f}{r['keras']:15.3f}{r['tfmp']:15.3f}"
              f"{r['tfmp'] / r['keras']:15.3f}")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    from tfmp import cli

    cli.run(main)
