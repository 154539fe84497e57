"""What the recipes share: their main, their set-up and the training loop (TensorFlow only).

A recipe defines its flags with `run_config.define_flags`; its `main` is
`run_main`, which makes one `RunConfig` from them (validated once) and calls the
recipe's `run(config, **model_args)`. `run` calls `prepare(config, model_args)`
before building anything (paths, devices, and `model_dir/config.json`: resuming
with another model is refused there), then `train_and_evaluate(config, ...)` with
a model builder and its datasets. Checkpoints (atomic `BackupAndRestore`,
loss-scale state included), TensorBoard scalars (loss, learning rate, loss scale,
skipped steps, examples/second), the loss-scale monitor and the SavedModel export
are handled here, the same way for every recipe.

Example:

    config = RunConfig(recipe="image_classification", batch_size=8, epochs=1)
    prepare(config, {"model": "resnet_mini"})
    train_and_evaluate(config, build_model, train, evaluation)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

import keras

from tfmp import _io, _tf, cli, distribute, losses, optimizer_config, policies, run_config
from tfmp import callbacks as tfmp_callbacks
from tfmp.optimizers import LossScaleOptimizer

# Re-exported: usage errors belong to tfmp.cli, which reports them (exit status 2).
UsageError = cli.UsageError
usage_errors = cli.usage_errors

RunConfig = run_config.RunConfig
parse_loss_scale = run_config.parse_loss_scale
parse_jit_compile = run_config.parse_jit_compile
JIT_COMPILE_CHOICES = run_config.JIT_COMPILE_CHOICES


def run_main(run: Callable[..., dict], recipe: str, run_flags: dict, model_flags: dict) -> int:
    """A recipe's `main`: its config from the flags, `run(config, **model_args)`, the result.

    Errors propagate: `tfmp.cli.run` reports them in one line (exit status 2 for
    a usage error, 1 for a failure).

    Args:
        run: The recipe's `run(config, **model_args)`.
        recipe: The recipe's name.
        run_flags: The holders `run_config.define_flags` returned.
        model_flags: The holders of the recipe's model flags (`cli.define_flags`).

    Returns:
        0, after a `results: {...}` line on stdout.
    """
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # TensorFlow's INFO chatter
    logger = logging.getLogger("tfmp")  # the run's summary line, "auto"'s choice: plain lines
    logger.setLevel(logging.INFO)
    if not any(getattr(h, "_tfmp_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("tfmp: %(message)s"))
        handler._tfmp_cli = True
        logger.addHandler(handler)
        logger.propagate = False
    with usage_errors():
        config = run_config.from_flags(recipe, run_flags)
    results = run(config, **cli.flag_values(model_flags))
    print("results: " + json.dumps(results, sort_keys=True))
    return 0


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


def prepare(config: RunConfig, model_args: dict | None = None) -> None:
    """A recipe's first call: checks the paths and the run directory, sets up the devices.

    Runs before any model or dataset is built (MultiWorkerMirroredStrategy and
    logical CPU devices must come before TensorFlow's first op). The config
    itself was validated when it was made.

    Args:
        config: The run's settings.
        model_args: The recipe's model arguments: recorded with the config in
            `model_dir/config.json`, or checked against the run there
            (`run_config.record_run`).

    Raises:
        UsageError: for an output path that cannot be written, `multi_worker`
            with a missing or bad `TF_CONFIG`, or a `model_dir` that holds a run
            with other fixed settings.
    """
    check_output_paths(config.model_dir, config.export_dir)
    if config.steps_per_epoch:  # the schedule fits the run (else: once the data is known)
        total_steps(config, None)
    with usage_errors():
        distribute.configure_cpu_replicas(config.cpu_replicas)
        strategy = distribute.create_strategy(config.distribution)
        if config.model_dir:
            run_config.record_run(config.model_dir, config, model_args or {},
                                  write=distribute.is_chief(strategy))
    keras.utils.set_random_seed(config.seed)


def make_optimizer(config: RunConfig, policy: str, total_steps: int | None = None
                   ) -> LossScaleOptimizer:
    """The run's optimizer (`optimizer_config.make_optimizer`) in tfmp's LossScaleOptimizer:
    scaling under `mixed_float16` only, non-finite steps skipped under every policy.

    Args:
        config: The run's settings.
        policy: The resolved policy name.
        total_steps: Steps of the whole run (batches: Keras' schedules count every
            step of an accumulation), or None for a constant rate without warm-up.

    Returns:
        A `tfmp.LossScaleOptimizer`.
    """
    effective_batch = config.batch_size * config.optimizer.grad_accum_steps
    return optimizer_config.make_optimizer(config.optimizer, policy=policy,
                                           total_steps=total_steps,
                                           global_batch_size=effective_batch,
                                           loss_scale=config.loss_scale_value)


def total_steps(config: RunConfig, train_data) -> int | None:
    """Steps of the whole run, if the schedule needs them (None for a constant rate).

    Raises:
        UsageError: for a schedule over a dataset of unknown length without
            `steps_per_epoch`.
    """
    opt = config.optimizer
    if opt.lr_schedule == "constant" and not opt.warmup_steps:
        return None
    steps = config.steps_per_epoch
    if not steps:
        cardinality = getattr(train_data, "cardinality", None)
        steps = int(cardinality()) if cardinality else -1
        if steps < 1:
            raise UsageError(
                f"`lr_schedule={opt.lr_schedule!r}` (or a warm-up) needs the run's length: "
                "pass --steps_per_epoch, the dataset's length is unknown. Received: "
                "steps_per_epoch=None")
    with usage_errors():
        optimizer_config.learning_rate_schedule(opt, total_steps=steps * config.epochs,
                                                global_batch_size=config.batch_size)
    return steps * config.epochs


def describe_run(config: RunConfig, policy: str, strategy) -> str:
    """The one line that says which devices and policy a run uses."""
    gpus = len(_tf.import_tensorflow("tfmp.training").config.list_physical_devices("GPU"))
    scale = ("dynamic loss scale" if config.loss_scale_value is None
             else f"fixed loss scale {config.loss_scale_value:g}")
    precision = {"mixed_float16": f"float16 compute, float32 variables, {scale}",
                 "mixed_bfloat16": "bfloat16 compute, float32 variables, no loss scale",
                 "float32": "float32"}.get(policy, policy)
    devices = f"{gpus} GPU(s)" if gpus else "CPU only (no GPU found)"
    return (f"policy {policy} ({precision}); {devices}; distribution "
            f"{config.distribution} ({strategy.num_replicas_in_sync} replica(s)); "
            f"optimizer {config.optimizer.optimizer}")


def _callbacks(config: RunConfig, chief: bool) -> list:
    model_dir = config.model_dir
    # Every policy: skipped steps are logged, and the monitor guards the model's
    # non-trainable state (batch-norm statistics) on skipped steps.
    log_dir = os.path.join(model_dir, "logs", "loss_scale") if model_dir and chief else None
    callbacks = [tfmp_callbacks.Throughput(config.batch_size),
                 tfmp_callbacks.LossScaleMonitor(log_dir=log_dir)]
    if model_dir:
        callbacks.append(tfmp_callbacks.BackupAndRestore(
            os.path.join(model_dir, "backup"), delete_checkpoint=False, write=chief))
        if chief:  # epoch scalars: loss, learning_rate, loss_scale, skips, examples/second
            callbacks.append(keras.callbacks.TensorBoard(os.path.join(model_dir, "logs")))
    return callbacks


def train_and_evaluate(
    config: RunConfig,
    build_model: Callable[[], keras.Model],
    train_data,
    eval_data,
    *,
    verbose: int = 2,
) -> dict:
    """Compiles, fits (resumably), evaluates and optionally exports a model.

    Call `prepare(config, model_args)` first (the recipes' `run` does).

    Args:
        config: The run's settings.
        build_model: Called under the policy and the strategy's scope; returns a
            built model whose output is class probabilities.
        train_data: Training dataset of `(inputs, labels)` batches of `config.batch_size`.
        eval_data: Evaluation dataset, or None.
        verbose: Keras `fit` verbosity.

    Returns:
        A dict of final metrics: `policy`, `loss`, `accuracy`, `eval_loss`,
        `eval_accuracy`, `loss_scale`, `skipped_steps`, `optimizer_steps` (applied
        steps, over resumed runs too), `learning_rate` (at the end),
        `examples_per_second` (one value per epoch run), `epochs_run` (in this
        run), `jit_compile` (as resolved by Keras), `steps_per_execution`,
        `model_file` (`model_dir/model.keras`, or None), `export_dir`.
    """
    resolved = policies.set_global_policy(config.policy)
    strategy = distribute.create_strategy(config.distribution)
    chief = distribute.is_chief(strategy)
    steps = total_steps(config, train_data)
    logging.getLogger("tfmp").info("%s", describe_run(config, resolved, strategy))
    with strategy.scope():
        model = build_model()
        optimizer = make_optimizer(config, resolved, steps)
        model.compile(optimizer=optimizer,
                      loss=losses.SparseCategoricalCrossentropy(
                          label_smoothing=config.label_smoothing),
                      metrics=["accuracy"], jit_compile=parse_jit_compile(config.jit_compile),
                      steps_per_execution=config.steps_per_execution)
    if config.steps_per_epoch:
        train_data = train_data.repeat()  # epochs of steps_per_epoch steps never run dry
    with distribute.keras_fit_scope(model, strategy):
        history = model.fit(train_data, epochs=config.epochs,
                            steps_per_epoch=config.steps_per_epoch,
                            callbacks=_callbacks(config, chief), verbose=verbose, shuffle=False)
    stats = optimizer.stats()
    results = {
        "policy": resolved,
        "loss": _last(history, "loss"),
        "accuracy": _last(history, "accuracy"),
        "examples_per_second": history.history.get("examples_per_second", []),
        "epochs_run": len(history.history.get("loss", [])),
        "loss_scale": stats["loss_scale"],
        "skipped_steps": stats["skipped_steps"],
        "optimizer_steps": stats["iterations"],
        "learning_rate": float(keras.ops.convert_to_numpy(
            optimizer.inner_optimizer.learning_rate)),
        "jit_compile": bool(model.jit_compile),
        "steps_per_execution": config.steps_per_execution,
    }
    if eval_data is not None:
        with distribute.keras_fit_scope(model, strategy):
            evaluated = model.evaluate(eval_data, verbose=0, return_dict=True)
        results.update(eval_loss=evaluated["loss"], eval_accuracy=evaluated["accuracy"])
    results.update(_save(config, model, chief))
    return results


def _save(config: RunConfig, model: keras.Model, chief: bool) -> dict:
    """Saves `model_dir/model.keras` and the SavedModel export; returns their paths."""
    saved = {"model_file": None, "export_dir": None}
    if config.model_dir:
        with distribute.chief_path(os.path.join(config.model_dir, "model.keras"), chief) as path:
            _save_model_atomically(model, path)
        saved["model_file"] = path if chief else None
    if config.export_dir:
        from tfmp import export

        with distribute.chief_path(config.export_dir, chief) as path:
            export.export_saved_model(model, path)
        saved["export_dir"] = os.path.abspath(config.export_dir) if chief else None
    return saved


def _save_model_atomically(model: keras.Model, path: str) -> None:
    """`model.save(path)` into a hidden sibling, fsynced and renamed into place (`tfmp._io`)."""
    with _io.atomic_path(path) as partial:
        model.save(partial)


def _last(history, key):
    values = history.history.get(key)
    return float(values[-1]) if values else None
