"""How `tfmp.benchmark` trains and measures one row, on the TensorFlow or the JAX backend.

The backend-specific pieces are small functions switched on
`keras.backend.backend()` (`device_name`, `has_tf32`, `set_tf32`,
`peak_memory_mib`, `is_out_of_memory`); under JAX none imports TensorFlow. A
`Runner` builds, compiles and warms up one row's model and times `steps` steps
at a time; a `Process` is a `Runner` in a spawned process (its own peak memory);
`interleave` drives several in turn, the order reversed every other repeat.
`find_max_batch` searches the largest batch that trains, by doubling then
bisection.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

from tfmp import benchmark_models

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Read when JAX starts its GPU client (not at import): allocate on demand, so that the
# processes share the GPU and each one's peak is its own.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

MAX_BATCH_TOLERANCE = 1 / 32
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")  # jax.Device.platform


def backend() -> str:
    """`keras.backend.backend()`."""
    import keras

    return keras.backend.backend()


def _tf():
    from tfmp import _tf as tensorflow  # Only on the TensorFlow backend.

    return tensorflow.import_tensorflow("tfmp.benchmark")


def device_name() -> str:
    """`"GPU (<name>)"` (`" xN"` appended for N GPUs) or `"CPU"`; `"unknown"` on other
    backends than TensorFlow and JAX."""
    if backend() == "tensorflow":
        gpus = _tf().config.list_physical_devices("GPU")
        if not gpus:
            return "CPU"
        name = _tf().config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    elif backend() != "jax":
        return "unknown"
    else:
        import jax

        gpus = [d for d in jax.devices() if d.platform in _GPU_PLATFORMS]
        if not gpus:
            return "CPU"
        name = gpus[0].device_kind
    return f"GPU ({name}){f' x{len(gpus)}' if len(gpus) > 1 else ''}"


def has_tf32() -> bool:
    """Whether the first GPU has TF32: compute capability 8.0 (Ampere) or later, or unknown."""
    from tfmp import policies

    capabilities = policies.gpu_capabilities()
    return not capabilities or capabilities[0] >= (8, 0)


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and convolutions: on (the default) or off (strict float32)."""
    if backend() == "tensorflow":
        _tf().config.experimental.enable_tensor_float_32_execution(enabled)
    else:
        import jax  # Read when a step is traced (and part of jit's cache key).

        jax.config.update("jax_default_matmul_precision", None if enabled else "highest")


def peak_memory_mib() -> tuple[float, str]:
    """`(MiB, kind)`: this process' peak GPU allocation (`"gpu_peak"`), else its peak RSS."""
    if backend() == "tensorflow":
        if _tf().config.list_physical_devices("GPU"):
            return _tf().config.experimental.get_memory_info("GPU:0")["peak"] / 2**20, "gpu_peak"
    else:
        import jax

        stats = jax.devices()[0].memory_stats()  # None on a CPU.
        if stats and "peak_bytes_in_use" in stats:
            return stats["peak_bytes_in_use"] / 2**20, "gpu_peak"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is the backend's out-of-memory error."""
    if backend() == "tensorflow" and isinstance(error, _tf().errors.ResourceExhaustedError):
        return True
    return any(s in str(error) for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory"))


def set_random_seed(seed: int) -> None:
    """`keras.utils.set_random_seed`, which under JAX leaves out its `tf.random.set_seed`.

    (Keras seeds TensorFlow whenever it is installed, importing it.)
    """
    import keras

    if backend() == "tensorflow":
        keras.utils.set_random_seed(seed)
        return
    import random

    import numpy as np
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator
    from keras.src.utils import rng_utils

    global_state.set_global_attribute(rng_utils.GLOBAL_RANDOM_SEED, seed)
    global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
    random.seed(seed)
    np.random.seed(seed)


def configure_process() -> None:
    """Sets up a worker process: TensorFlow allocates GPU memory on demand (JAX: see the top)."""
    if backend() == "tensorflow":
        for gpu in _tf().config.list_physical_devices("GPU"):
            _tf().config.experimental.set_memory_growth(gpu, True)  # The processes share it.


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything a worker needs to build, compile and feed one row's model.

    `optimizer`: `"tfmp"` (`tfmp.LossScaleOptimizer`, scaling under mixed_float16
    only), `"keras"` (Keras' `LossScaleOptimizer`) or `"plain"` (Adam alone).
    """

    name: str
    policy: str
    model: benchmark_models.ModelConfig
    batch_size: int
    warmup: int
    jit_compile: bool
    seed: int
    tf32: bool = True
    optimizer: str = "tfmp"
    learning_rate: float = 1e-3


def _optimizer(spec: Spec):
    """The row's Adam: tfmp's (as the recipes train), Keras' `LossScaleOptimizer` or plain."""
    import keras

    from tfmp import optimizer_config

    if spec.optimizer == "tfmp":  # What the recipes train with.
        return optimizer_config.make_optimizer(
            optimizer_config.OptimizerConfig(optimizer="adam", learning_rate=spec.learning_rate),
            policy=spec.policy, total_steps=None, global_batch_size=spec.batch_size)
    optimizer = keras.optimizers.Adam(spec.learning_rate)
    if spec.optimizer == "keras":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _build(spec: Spec) -> tuple:
    """The model (compiled) and one fixed batch `(x, y)` as tensors."""
    import keras

    set_random_seed(spec.seed)
    model = benchmark_models.build(spec.model, spec.policy)
    x, y = benchmark_models.synthetic_batch(model, spec.batch_size, spec.seed)
    model.compile(optimizer=_optimizer(spec), loss="sparse_categorical_crossentropy",
                  jit_compile=spec.jit_compile, auto_scale_loss=False)
    to_tensor = keras.ops.convert_to_tensor
    x = [to_tensor(v) for v in x] if isinstance(x, list) else to_tensor(x)
    return model, x, to_tensor(y)


class Runner:
    """One row's model, trained `steps` steps at a time."""

    def __init__(self, spec: Spec, isolated: bool) -> None:
        """Builds `spec`'s model and trains its `warmup` steps; `isolated`: this process holds
        this row alone (its peak memory is the row's; TF32 is set once)."""
        from tfmp import audit

        self.spec, self.isolated = spec, isolated
        set_tf32(spec.tf32)
        self.model, self.x, self.y = _build(spec)
        self.loss = float("nan")
        for _ in range(spec.warmup):
            self.loss = float(self.model.train_on_batch(self.x, self.y))
        self.info = {
            "activation_bytes_per_example": audit.activation_bytes_per_example(self.model),
            "params": int(self.model.count_params()), "device": device_name()}

    def run(self, steps: int) -> tuple[float, float, float]:
        """`(wall seconds, process CPU seconds, last loss)` of `steps` training steps."""
        if not self.isolated:
            set_tf32(self.spec.tf32)  # The rows share this process' setting.
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(steps):
            loss = self.model.train_on_batch(self.x, self.y)  # Returns a number: synchronous.
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        self.loss = float(loss)
        return wall, cpu, self.loss

    def finish(self) -> dict:
        """`{"final_loss", "peak_memory_mib", "memory_kind"}` (no peak when not isolated)."""
        peak, kind = peak_memory_mib() if self.isolated else (None, None)  # else: shared
        return {"final_loss": self.loss, "peak_memory_mib": peak, "memory_kind": kind}


def find_max_batch(fits: Callable[[int], bool], start: int, limit: int,
                   tolerance: float = MAX_BATCH_TOLERANCE) -> tuple[int, bool]:
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


def search_max_batch(spec: Spec, limit: int) -> tuple[int, bool]:
    """In this (fresh) process: the largest batch of `spec`'s model that trains on the GPU."""
    import keras

    built: list = []

    def fits(batch: int) -> bool:
        if not built:
            built.extend(_build(spec))
        model, x, y = built

        def grow(v):  # `batch` examples: the fixed batch repeated
            return keras.ops.repeat(v, -(-batch // spec.batch_size), axis=0)[:batch]

        try:
            xb = [grow(v) for v in x] if isinstance(x, list) else grow(x)
            for _ in range(2):
                model.train_on_batch(xb, grow(y))
            return True
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            built.clear()  # A failed step can leave donated (deleted) buffers: build anew.
            keras.backend.clear_session()
            return False

    set_tf32(spec.tf32)
    return find_max_batch(fits, spec.batch_size, limit)


def _worker(conn, spec: Spec, task: str, limit: int) -> None:
    """A spawned process: `task` "train" serves run/finish requests; "max_batch" searches."""
    try:
        configure_process()
        if task == "max_batch":
            conn.send(("ok", search_max_batch(spec, limit)))
            return
        runner = Runner(spec, isolated=True)
        conn.send(("ok", runner.info))
        while True:
            command, steps = conn.recv()
            conn.send(("ok", runner.run(steps) if command == "run" else runner.finish()))
            if command != "run":
                return
    except Exception as e:  # Reported by the parent, with the row's name.
        conn.send(("error", f"{type(e).__name__}: {' '.join(str(e).split())}"))
    finally:
        conn.close()


class Process:
    """A `Runner` in a spawned process, with the same methods."""

    def __init__(self, spec: Spec, task: str = "train", limit: int = 0) -> None:
        """Starts it: `task` `"train"` (a `Runner`) or `"max_batch"` (`search_max_batch` up to
        `limit`, whose result `receive` returns)."""
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.name = spec.name
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, spec, task, limit),
                                       daemon=True)
        self.process.start()
        child.close()

    def receive(self) -> Any:
        """The next reply (first `Runner.info`, or the search's result); raises
        `RuntimeError` for an error in the process, or a process that died."""
        while not self.conn.poll(1.0):
            if not self.process.is_alive():
                raise RuntimeError(f"the {self.name} worker process died "
                                   f"(exit code {self.process.exitcode}).")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"{self.name}: {value}")
        return value

    def run(self, steps: int) -> tuple[float, float, float]:
        """`Runner.run` in the process."""
        self.conn.send(("run", steps))
        return self.receive()

    def finish(self) -> dict:
        """`Runner.finish` in the process, which then ends."""
        self.conn.send(("finish", 0))
        result = self.receive()
        self.close()
        return result

    def close(self) -> None:
        """Waits for the process to end (30 s at most, then terminates it)."""
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()


def interleave(specs: dict[str, Spec], *, steps: int, repeats: int, isolate: bool,
               progress: bool) -> dict[str, dict]:
    """Trains every spec's model, taking turns, the order reversed every other repeat.

    Args:
        specs: The rows, by name (all with the same batch size).
        steps: Steps per measurement.
        repeats: Measurements per row.
        isolate: One spawned process per row, else all in this process.
        progress: Show a `keras.utils.Progbar`.

    Returns:
        Per row: `{"info": Runner.info, "times": [(wall, cpu), ...], "final": Runner.finish()}`.
    """
    import keras

    names = list(specs)
    batch = next(iter(specs.values())).batch_size
    bar = keras.utils.Progbar(len(names) * (repeats + 1), verbose=1 if progress else 0,
                              stateful_metrics=[f"{n} ex/s" for n in names])
    runners: dict[str, Any] = {}
    try:
        for n in names:  # Start the processes together: their imports overlap.
            runners[n] = Process(specs[n]) if isolate else Runner(specs[n], isolated=False)
        out = {n: {"info": runners[n].receive() if isolate else runners[n].info, "times": []}
               for n in names}
        bar.add(len(names))
        for r in range(repeats):
            for n in names if r % 2 == 0 else names[::-1]:
                wall, cpu, _ = runners[n].run(steps)
                out[n]["times"].append((wall, cpu))
                bar.add(1, values=[(f"{n} ex/s", batch * steps / wall)])
        for n in names:
            out[n]["final"] = runners[n].finish()
    finally:
        for runner in runners.values():
            if isinstance(runner, Process):
                runner.close()
    return out
