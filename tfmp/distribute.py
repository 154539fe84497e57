"""Where `tf.distribute` strategies are made (TensorFlow only).

One function turns the recipes' `--distribution` flag into a strategy:
`"none"` (the default strategy), `"mirrored"` (all local GPUs, or the logical
CPUs when there is no GPU) and `"multi_worker"` (reads `TF_CONFIG`).

Example:

    strategy = tfmp.distribute.create_strategy("mirrored")
    with strategy.scope():
        model = build_model()
        model.compile(optimizer=tfmp.LossScaleOptimizer(keras.optimizers.Adam()), ...)
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator

from tfmp import _checks, _tf
from tfmp.run_config import DISTRIBUTIONS, validate_distribution  # noqa: F401 (re-exported)

tf = _tf.import_tensorflow('tfmp.distribute')

_TF_CONFIG_EXAMPLE = ('{"cluster": {"worker": ["host1:port", "host2:port"]}, '
                      '"task": {"type": "worker", "index": 0}}')


def configure_cpu_replicas(count: int) -> None:
    """Splits the CPU into `count` logical devices, so `"mirrored"` has replicas without GPUs.

    Must run before TensorFlow initialises its devices (before any op runs).

    Args:
        count: Logical CPU devices (>= 1).
    """
    _checks.integer("cpu_replicas", count)
    if count == 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as e:  # already initialised
        have = len(tf.config.list_logical_devices("CPU"))
        if have != count:
            raise RuntimeError(
                f"Cannot split the CPU into {count} devices: TensorFlow is already "
                f"initialised with {have}. Call configure_cpu_replicas() first."
            ) from e


def parse_tf_config(text: str | None = None) -> dict:
    """Parses and checks `TF_CONFIG` for `"multi_worker"`, naming it in every error.

    Args:
        text: The JSON text; by default the `TF_CONFIG` environment variable.

    Returns:
        The parsed `{"cluster": {job: ["host:port", ...]}, "task": {"type": job,
        "index": i}, ...}`.

    Raises:
        ValueError: when `TF_CONFIG` is unset, not JSON, has no non-empty `cluster`
            of `"host:port"` lists, or no `task` whose `type` is a job of the
            cluster and whose `index` is an integer within that job.
    """
    if text is None:
        text = os.environ.get("TF_CONFIG")
    if text is None:
        raise ValueError(
            "`distribution`='multi_worker' needs the TF_CONFIG environment variable "
            "(run through `python -m tools.launch_local --num_workers=N -- ...` or set "
            "it as for tf.distribute.MultiWorkerMirroredStrategy).")
    shown = text if len(text) <= 300 else text[:300] + "..."

    def bad(problem: str) -> ValueError:
        return ValueError(f"TF_CONFIG {problem}. Expected e.g. {_TF_CONFIG_EXAMPLE}. "
                          f"Received: TF_CONFIG={shown!r}")

    try:
        config = json.loads(text)
    except ValueError as e:
        raise bad(f"is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise bad(f"must be a JSON object, not {type(config).__name__}")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise bad('has no "cluster" (a non-empty object of job name: address list)')
    for job, addresses in cluster.items():
        if (not isinstance(addresses, list) or not addresses or not all(
                isinstance(a, str) and ":" in a for a in addresses)):
            raise bad(f'cluster.{job} must be a non-empty list of "host:port" strings')
    if not isinstance(task, dict):
        raise bad('has no "task" (an object with "type" and "index")')
    job, index = task.get("type"), task.get("index")
    if job not in cluster:
        raise bad(f"task.type must be one of the cluster's jobs ({', '.join(cluster)}), "
                  f"not {job!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not (
            0 <= index < len(cluster[job])):
        raise bad(f"task.index must be an integer in [0, {len(cluster[job])}) for the "
                  f"{len(cluster[job])} {job} address(es), not {index!r}")
    return config


_STRATEGIES: dict = {}


def create_strategy(distribution: str = "none") -> tf.distribute.Strategy:
    """Creates the strategy for `distribution` (one per process and kind).

    TensorFlow's collective ops do not tolerate two strategies of the same kind
    in one process well, so the strategy is made once and reused.

    Args:
        distribution: `"none"`, `"mirrored"` or `"multi_worker"`.

    Returns:
        A `tf.distribute.Strategy`.

    Raises:
        ValueError: for an unknown `distribution`, or `"multi_worker"` with a
            missing or bad `TF_CONFIG` (see `parse_tf_config`).
    """
    validate_distribution(distribution)
    if distribution == "none":
        return tf.distribute.get_strategy()
    if distribution not in _STRATEGIES:
        if distribution == "mirrored":
            gpus = tf.config.list_logical_devices("GPU")
            devices = [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
            _STRATEGIES[distribution] = tf.distribute.MirroredStrategy(devices)
        else:
            parse_tf_config()  # a bad TF_CONFIG is named here, not deep inside TensorFlow
            _STRATEGIES[distribution] = tf.distribute.MultiWorkerMirroredStrategy()
    return _STRATEGIES[distribution]


def is_chief(strategy: tf.distribute.Strategy | None = None) -> bool:
    """Whether this process is the chief (writes checkpoints, logs and exports)."""
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


@contextlib.contextmanager
def chief_path(path: str, chief: bool) -> Iterator[str]:
    """Yields where this worker writes `path`: `path` itself on the chief, else a scratch path.

    Every worker must take part in writing a model (reading variables that are
    synchronised on read is a collective), but only the chief's copy is kept:
    the others write into a temporary directory removed on exit.

    Args:
        path: The file or directory the chief writes.
        chief: Whether this process is the chief (see `is_chief`).
    """
    if chief:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="tfmp-scratch-") as scratch:
        yield os.path.join(scratch, os.path.basename(os.path.normpath(path)))


@contextlib.contextmanager
def keras_fit_scope(model, strategy: tf.distribute.Strategy) -> Iterator[None]:
    """Works around Keras 3's `fit`/`evaluate` failures under MultiWorkerMirroredStrategy.

    Keras 3.15 (keras-team/keras#20585, tensorflow/tensorflow#72388) fails twice
    with more than one worker: its symbolic build eagerly reduces a per-replica
    batch ("Attempt to convert a value (PerReplica...)"), and its train step
    reduces the scalar logs with `axis=0` ("Invalid reduction dimension 0 for
    input with 0 dimensions"). Inside this scope the build is deferred to the
    tracing of the train step (the model's strategy comes from the scope
    instead), and the logs are averaged over all replicas with `axis=None`.
    Gradients and the loss scale are synchronised by tfmp's optimizer as ever.
    Other strategies are untouched.

    Args:
        model: A compiled Keras model created under `strategy.scope()`.
        strategy: The strategy it was created with.
    """
    multi_worker = (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
                    and strategy.extended._in_multi_worker_mode())
    if not multi_worker:
        yield
        return
    from keras.src.backend.tensorflow import trainer as keras_tf_trainer

    original = keras_tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean"):
            return original(values, strategy, reduction)
        return tf.nest.map_structure(
            lambda v: strategy.reduce("MEAN", v, axis=None)
            if isinstance(v, tf.distribute.DistributedValues) else v, values)

    saved_strategy = model._distribute_strategy
    model._distribute_strategy = None
    keras_tf_trainer.reduce_per_replica = reduce_per_replica
    try:
        with strategy.scope():
            yield
    finally:
        model._distribute_strategy = saved_strategy
        keras_tf_trainer.reduce_per_replica = original
