"""What the recipes share: their flags, argument checks and the training loop (TensorFlow only).

A recipe defines its flags with `define_flags`, checks them with `prepare`
before building anything, and calls `train_and_evaluate` with a model builder
and its datasets. Checkpoints (atomic `BackupAndRestore`, loss-scale state
included), TensorBoard logs, the loss-scale monitor, throughput and the
SavedModel export are handled here, the same way for every recipe.
The settings that define the model are recorded in `model_dir/run.json`, so
that resuming with another model is refused before it is built.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable

import keras
from absl import flags

from tfmp import _io, cli, distribute, losses, optimizer_config, policies
from tfmp import callbacks as tfmp_callbacks
from tfmp.optimizers import LossScaleOptimizer

# Re-exported: usage errors belong to tfmp.cli, which reports them (exit status 2).
UsageError = cli.UsageError
usage_errors = cli.usage_errors

RUN_FILE = "run.json"


def run_main(run: Callable[..., dict], values: dict, **extra) -> int:
    """Calls a recipe's `run(**values, **extra)` for its `main`, printing the result.

    Errors propagate: `tfmp.cli.run` reports them in one line (exit status 2 for
    a usage error, 1 for a failure).

    Returns:
        0, after a `results: {...}` line on stdout.
    """
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # TensorFlow's INFO chatter
    logging.getLogger("tfmp").setLevel(logging.INFO)  # e.g. why "auto" chose a policy
    results = run(**values, **extra)
    print("results: " + json.dumps(results, sort_keys=True))
    return 0


def parse_loss_scale(value: str | float) -> float | None:
    """Parses `--loss_scale`: `"dynamic"` gives None, else a positive finite number.

    Args:
        value: `"dynamic"` or a number (string or float).

    Returns:
        None for dynamic scaling, else the fixed scale.
    """
    if value == "dynamic":
        return None
    try:
        scale = float(value)
    except (TypeError, ValueError):
        scale = float("nan")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"`loss_scale` must be 'dynamic' or a positive number. Received: loss_scale={value!r}")
    return scale


JIT_COMPILE_CHOICES = ("auto", "true", "false")


def parse_jit_compile(value: str | bool) -> str | bool:
    """Parses `--jit_compile`: `"auto"` (Keras chooses on the device), `"true"` or `"false"`.

    Args:
        value: One of `JIT_COMPILE_CHOICES` (any case) or a bool.

    Returns:
        `"auto"`, True or False: the `jit_compile` argument of `model.compile`.

    Raises:
        ValueError: for any other value.
    """
    if isinstance(value, bool):
        return value
    choice = value.lower() if isinstance(value, str) else None
    if choice not in JIT_COMPILE_CHOICES:
        raise ValueError("`jit_compile` must be one of 'auto', 'true', 'false' (or a bool). "
                         f"Received: jit_compile={value!r}")
    return {"auto": "auto", "true": True, "false": False}[choice]


def check_steps_per_execution(steps_per_execution: int, steps_per_epoch: int | None) -> None:
    """Refuses a `steps_per_execution` that is not a positive integer or does not divide
    `steps_per_epoch`.

    Keras runs whole executions: with `steps_per_epoch=6` and
    `steps_per_execution=4` each epoch would run 8 steps.

    Args:
        steps_per_execution: Train steps per call into the device.
        steps_per_epoch: Steps per epoch, or None for a full pass over the data.

    Raises:
        ValueError: naming the argument, the value received and what is allowed.
    """
    _positive("steps_per_execution", steps_per_execution)
    if steps_per_epoch and steps_per_epoch % steps_per_execution:
        raise ValueError(
            "`steps_per_epoch` must be a multiple of `steps_per_execution` (Keras runs whole "
            "executions: each epoch would run "
            f"{math.ceil(steps_per_epoch / steps_per_execution) * steps_per_execution} steps). "
            f"Received: steps_per_epoch={steps_per_epoch}, "
            f"steps_per_execution={steps_per_execution}")


def _positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")


def check_args(*, policy: str, loss_scale: str, dataset: str, datasets: tuple, batch_size: int,
               epochs: int, steps_per_epoch: int | None, learning_rate: float,
               distribution: str, seed: int = 0, model_dir: str | None = None,
               export_dir: str | None = None, num_synthetic: int = 1,
               steps_per_execution: int = 1, jit_compile: str | bool = "auto") -> None:
    """Refuses bad recipe arguments before any model is built.

    Raises:
        UsageError: naming the argument, the value received and what is allowed.
    """
    with usage_errors():
        policies.validate_policy_name(policy)
        parse_loss_scale(loss_scale)
        if dataset not in datasets:
            raise ValueError(
                f"Unknown `dataset`: {dataset!r}. Expected one of: {', '.join(datasets)}.")
        _positive("batch_size", batch_size)
        _positive("epochs", epochs)
        _positive("steps_per_epoch", steps_per_epoch, allow_none=True)
        _positive("num_synthetic", num_synthetic)
        check_steps_per_execution(steps_per_execution, steps_per_epoch)
        parse_jit_compile(jit_compile)
        optimizer_config.OptimizerConfig(optimizer="adam", learning_rate=learning_rate)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"`seed` must be an integer >= 0. Received: seed={seed!r}")
        distribute.validate_distribution(distribution)
        check_output_paths(model_dir, export_dir)


def check_output_paths(model_dir: str | None, export_dir: str | None) -> None:
    """Refuses, before any training, output paths that could not be written afterwards.

    Args:
        model_dir: The run directory (backups, logs, `model.keras`), or None.
        export_dir: The SavedModel directory, or None.

    Raises:
        UsageError: for a path that is a file or under one, or read-only; an
            `export_dir` that is neither new, empty nor a SavedModel, or is
            `model_dir`, inside it or around it (an export replaces its directory).
    """
    if model_dir:
        cli.check_output_dir(model_dir, argument="model_dir")
    if export_dir:
        from tfmp import export

        with usage_errors():
            export.check_export_dir(export_dir)
        cli.check_output_dir(export_dir, argument="export_dir", replaced=True)
    if model_dir and export_dir:
        run, out = os.path.realpath(model_dir), os.path.realpath(export_dir)
        if os.path.commonpath([run, out]) in (run, out):
            raise UsageError(
                "`export_dir` must be outside `model_dir` and not contain it (the export "
                "replaces its directory whole). Received: "
                f"export_dir={export_dir!r}, model_dir={model_dir!r}")


def check_run_settings(model_dir: str, settings: dict, *, write: bool = True) -> None:
    """Refuses to resume a run in `model_dir` with settings that define another model.

    The first run records `settings` in `model_dir/run.json` (written atomically);
    a later run in the same directory must pass the same settings, else its
    backup would not fit the model it builds.

    Args:
        model_dir: The run directory.
        settings: The JSON-serializable settings that define the model (the
            recipe, the model's flags, the dataset, which sets the classes).
        write: Whether this process records them (the chief only).

    Raises:
        UsageError: naming each setting that differs from the recorded one.
    """
    path = os.path.join(model_dir, RUN_FILE)
    settings = json.loads(json.dumps(settings))  # as they read back: lists, not tuples
    try:
        with open(path) as f:
            recorded = json.load(f)["model_settings"]
    except FileNotFoundError:
        recorded = None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"`model_dir` has an unreadable {RUN_FILE} ({type(e).__name__}: "
                         f"{e}); remove it or pass a new --model_dir. "
                         f"Received: model_dir={model_dir!r}") from None
    if recorded is None:
        if write:
            os.makedirs(model_dir, exist_ok=True)
            _io.write_json_atomically(path, {"model_settings": settings})  # fsynced, renamed
        return
    names = sorted(set(recorded) | set(settings))
    changed = [name for name in names if recorded.get(name) != settings.get(name)]
    if changed:
        def listed(values):
            return ", ".join(f"{name}={values.get(name)!r}" for name in changed)

        raise UsageError(
            f"`model_dir` holds a run with {listed(recorded)}; this run has "
            f"{listed(settings)}. Pass the same settings to resume that run, or a new "
            f"--model_dir for a new run. Received: model_dir={model_dir!r}")


def prepare(*, cpu_replicas: int = 1, **args) -> None:
    """A recipe's first call: checks its shared arguments, then sets up devices and strategy.

    Runs before any model or dataset is built (MultiWorkerMirroredStrategy and
    logical CPU devices must come before TensorFlow's first op).

    Args:
        cpu_replicas: Logical CPU devices for `--distribution=mirrored` without GPUs.
        **args: The arguments of `check_args`.

    Raises:
        UsageError: for a bad argument or output path, or `multi_worker` with a
            missing or bad `TF_CONFIG`.
    """
    check_args(**args)
    with usage_errors():
        distribute.configure_cpu_replicas(cpu_replicas)
        distribute.create_strategy(args["distribution"])


def make_optimizer(learning_rate: float, policy: str, loss_scale: str = "dynamic"
                   ) -> LossScaleOptimizer:
    """Adam wrapped in tfmp's LossScaleOptimizer: scaling under `mixed_float16` only,
    non-finite steps skipped under every policy (`skip_nonfinite`).

    Args:
        learning_rate: Adam's learning rate.
        policy: The resolved policy name.
        loss_scale: `"dynamic"` or a fixed positive scale.

    Returns:
        A `tfmp.LossScaleOptimizer`.
    """
    config = optimizer_config.OptimizerConfig(optimizer="adam", learning_rate=learning_rate)
    return optimizer_config.make_optimizer(config, policy=policy, total_steps=None,
                                           global_batch_size=1,
                                           loss_scale=parse_loss_scale(loss_scale))


def train_and_evaluate(
    build_model: Callable[[], keras.Model],
    train_data,
    eval_data,
    *,
    policy: str,
    loss_scale: str = "dynamic",
    learning_rate: float = 1e-3,
    epochs: int = 1,
    steps_per_epoch: int | None = None,
    batch_size: int,
    jit_compile: str | bool = "auto",
    steps_per_execution: int = 1,
    distribution: str = "none",
    model_dir: str | None = None,
    export_dir: str | None = None,
    model_settings: dict | None = None,
    verbose: int = 2,
) -> dict:
    """Compiles, fits (resumably), evaluates and optionally exports a model.

    Args:
        build_model: Called under the policy and the strategy's scope; returns a
            built model whose output is class probabilities.
        train_data: Training dataset of `(inputs, labels)` batches of `batch_size`.
        eval_data: Evaluation dataset, or None.
        policy: Policy name (`"auto"` allowed).
        loss_scale: `"dynamic"` or a fixed positive scale.
        learning_rate: Adam's learning rate.
        epochs: Epochs to train.
        steps_per_epoch: Steps per epoch, or None for a full pass.
        batch_size: Global batch size (for examples/second).
        jit_compile: `"auto"` (Keras' choice on the device: XLA on GPUs, not on
            CPUs nor under `tf.distribute`), True or False, or the strings of
            `JIT_COMPILE_CHOICES`.
        steps_per_execution: Train steps per call into the device (Keras'
            `steps_per_execution`); callbacks' batch hooks run once per call.
        distribution: `"none"`, `"mirrored"` or `"multi_worker"`.
        model_dir: Directory for backups (`backup/`), TensorBoard logs (`logs/`)
            and the trained model (`model.keras`).
        export_dir: If set, a float32 SavedModel is exported there.
        model_settings: The settings that define the model: recorded in
            `model_dir/run.json`, or checked against a previous run's there
            before the model is built (`check_run_settings`).
        verbose: Keras `fit` verbosity.

    Returns:
        A dict of final metrics: `policy`, `loss`, `accuracy`, `eval_loss`,
        `eval_accuracy`, `loss_scale`, `skipped_steps`, `optimizer_steps` (applied
        steps, over resumed runs too), `examples_per_second` (one value per epoch
        run), `epochs_run` (in this run), `jit_compile` (as resolved by Keras),
        `steps_per_execution`, `model_file` (`model_dir/model.keras`, or None),
        `export_dir`.

    Raises:
        UsageError: when `model_dir` holds a run with other `model_settings`.
    """
    resolved = policies.set_global_policy(policy)
    strategy = distribute.create_strategy(distribution)
    chief = distribute.is_chief(strategy)
    if model_dir and model_settings is not None:
        check_run_settings(model_dir, model_settings, write=chief)
    with strategy.scope():
        model = build_model()
        optimizer = make_optimizer(learning_rate, resolved, loss_scale)
        model.compile(optimizer=optimizer, loss=losses.SparseCategoricalCrossentropy(),
                      metrics=["accuracy"], jit_compile=parse_jit_compile(jit_compile),
                      steps_per_execution=steps_per_execution)
    # Every policy: skipped steps are logged, and the monitor guards the model's
    # non-trainable state (batch-norm statistics) on skipped steps.
    log_dir = os.path.join(model_dir, "logs", "loss_scale") if model_dir and chief else None
    callbacks = [tfmp_callbacks.Throughput(batch_size),
                 tfmp_callbacks.LossScaleMonitor(log_dir=log_dir)]
    if model_dir:
        callbacks.append(tfmp_callbacks.BackupAndRestore(
            os.path.join(model_dir, "backup"), delete_checkpoint=False, write=chief))
        if chief:
            callbacks.append(keras.callbacks.TensorBoard(os.path.join(model_dir, "logs")))
    if steps_per_epoch:
        train_data = train_data.repeat()  # epochs of steps_per_epoch steps never run dry
    with distribute.keras_fit_scope(model, strategy):
        history = model.fit(train_data, epochs=epochs, steps_per_epoch=steps_per_epoch,
                            callbacks=callbacks, verbose=verbose, shuffle=False)
    results = {
        "policy": resolved,
        "loss": _last(history, "loss"),
        "accuracy": _last(history, "accuracy"),
        "examples_per_second": history.history.get("examples_per_second", []),
        "epochs_run": len(history.history.get("loss", [])),
        "loss_scale": float(keras.ops.convert_to_numpy(optimizer.loss_scale)),
        "skipped_steps": int(keras.ops.convert_to_numpy(optimizer.skipped_steps)),
        "optimizer_steps": int(keras.ops.convert_to_numpy(optimizer.iterations)),
        "jit_compile": bool(model.jit_compile),
        "steps_per_execution": steps_per_execution,
    }
    if eval_data is not None:
        with distribute.keras_fit_scope(model, strategy):
            evaluated = model.evaluate(eval_data, verbose=0, return_dict=True)
        results.update(eval_loss=evaluated["loss"], eval_accuracy=evaluated["accuracy"])
    results["model_file"] = results["export_dir"] = None
    if model_dir:
        with distribute.chief_path(os.path.join(model_dir, "model.keras"), chief) as path:
            _save_model_atomically(model, path)
        results["model_file"] = path if chief else None
    if export_dir:
        from tfmp import export

        with distribute.chief_path(export_dir, chief) as path:
            export.export_saved_model(model, path)
        results["export_dir"] = os.path.abspath(export_dir) if chief else None
    return results


def _save_model_atomically(model: keras.Model, path: str) -> None:
    """`model.save(path)` into a hidden sibling, fsynced and renamed into place (`tfmp._io`)."""
    with _io.atomic_path(path) as partial:
        model.save(partial)


def _last(history, key):
    values = history.history.get(key)
    return float(values[-1]) if values else None


def define_flags(*, datasets: tuple, default_dataset: str, default_batch_size: int = 128,
                 default_epochs: int = 10, default_learning_rate: float = 1e-3) -> dict:
    """Defines the flags every recipe has (at import time of the recipe module).

    Args:
        datasets: Dataset names the recipe accepts.
        default_dataset: The default `--dataset`.
        default_batch_size: The default global `--batch_size`.
        default_epochs: The default `--epochs`.
        default_learning_rate: The default `--learning_rate`.

    Returns:
        Flag holders by name; `flag_values(holders)` reads them. Flags already
        defined (when two recipes are imported into one process, as in tests)
        are reused, with the first recipe's defaults.
    """
    string, integer, real = flags.DEFINE_string, flags.DEFINE_integer, flags.DEFINE_float
    definitions = {
        "policy": (string, "mixed_float16",
                   f"Dtype policy: {', '.join(policies.POLICY_CHOICES)}."),
        "loss_scale": (string, "dynamic", "'dynamic' or a positive number (a fixed scale)."),
        "dataset": (string, default_dataset, f"Dataset: {', '.join(datasets)}."),
        "data_dir": (string, None, "TFDS data directory."),
        "batch_size": (integer, default_batch_size, "Global batch size."),
        "epochs": (integer, default_epochs, "Epochs to train."),
        "steps_per_epoch": (integer, None, "Steps per epoch (default: one pass over the data)."),
        "learning_rate": (real, default_learning_rate, "Adam's learning rate."),
        "jit_compile": (_define_jit_compile, "auto",
                        "XLA-compile the train step: auto (Keras' choice: on GPUs, not on "
                        "CPUs nor under tf.distribute), true or false."),
        "steps_per_execution": (integer, 1, "Train steps per call into the device (Keras' "
                                "steps_per_execution; a divisor of --steps_per_epoch)."),
        "distribution": (string, "none", f"One of: {', '.join(distribute.DISTRIBUTIONS)}."),
        "cpu_replicas": (integer, 1, "Logical CPUs for --distribution=mirrored without GPUs."),
        "model_dir": (string, None, "Checkpoints (resumed from) and TensorBoard logs."),
        "export_dir": (string, None, "Where to write a float32 SavedModel."),
        "seed": (integer, 0, "Random seed."),
        "num_synthetic": (integer, 2048, "Examples per split of a synthetic dataset."),
    }
    holders = {}
    for name, (define, default, help_text) in definitions.items():
        if name in flags.FLAGS:  # a second recipe imported in the same process (tests)
            holders[name] = flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
        else:
            holders[name] = define(name, default, help_text)
    return holders


def _define_jit_compile(name: str, default: str, help_text: str) -> flags.FlagHolder:
    return flags.DEFINE_enum(name, default, JIT_COMPILE_CHOICES, help_text,
                             case_sensitive=False)


def flag_values(holders: dict) -> dict:
    """The values of the flags `define_flags` returned, by name."""
    return {name: holder.value for name, holder in holders.items()}
