"""One run's settings, from the flags to `model_dir/config.json` (no TensorFlow needed).

`RunConfig` is a frozen dataclass with every setting the recipes share: the
policy, the data, the length of the run, the optimizer (an `OptimizerConfig`),
label smoothing, compilation, distribution, paths and seed. It is validated once,
when it is made (`ValueError` naming the first bad setting, the value and what is
allowed), and then passed whole: `recipe.run(config, **model_args)`.

A run directory records the run in `config.json`. Resuming in it with a setting
that changes the model, the data or the optimizer's variables (`RESUME_FIXED`,
plus every model argument of the recipe) is refused in one line naming each
difference; the other settings (epochs, learning rate, paths ...) may change and
the change is recorded under `"resumes"`.

Example:

    config = RunConfig(recipe="image_classification", batch_size=256, epochs=90,
                       optimizer=OptimizerConfig(optimizer="sgd", momentum=0.875))
    config.to_json()                          # what config.json records
    RunConfig.from_flat(config.flat())        # the same config, from flag values
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from tfmp import _checks, _io, cli, datasets, optimizer_config, policies
from tfmp.optimizer_config import OptimizerConfig

CONFIG_FILE = "config.json"
DISTRIBUTIONS = ("none", "mirrored", "multi_worker")  # `tfmp.distribute` builds them
LEGACY_RUN_FILE = "run.json"  # written by the recipes before config.json (model settings)
JIT_COMPILE_CHOICES = ("auto", "true", "false")
# The dataset kind each recipe trains on (another recipe: any dataset).
RECIPE_DATASETS = {"image_classification": "image", "text_classification": "text"}
# Settings a resumed run must share with the run it resumes: they define the data
# or the variables its backup holds (SGD with and without momentum, accumulators).
RESUME_FIXED = ("recipe", "policy", "dataset", "num_synthetic", "seed", "optimizer",
                "momentum", "grad_accum_steps")
_OPTIMIZER_FIELDS = tuple(f.name for f in dataclasses.fields(OptimizerConfig))


def validate_distribution(distribution: str) -> str:
    """Returns `distribution` if known, else raises `ValueError` listing the valid names."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"Unknown `distribution`: {distribution!r}. Expected one of: "
            f"{', '.join(DISTRIBUTIONS)}."
        )
    return distribution


class ConfigMismatchError(ValueError):
    """A run directory holds a run whose fixed settings differ from this run's."""


def parse_loss_scale(value: str | float) -> float | None:
    """Parses `--loss_scale`: `"dynamic"` gives None, else a positive finite number.

    Args:
        value: `"dynamic"` or a number (string or float).

    Returns:
        None for dynamic scaling, else the fixed scale.

    Raises:
        ValueError: for anything else.
    """
    if value == "dynamic":
        return None
    try:
        scale = float(value)
    except (TypeError, ValueError):
        scale = float("nan")
    if isinstance(value, bool) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"`loss_scale` must be 'dynamic' or a positive number. Received: loss_scale={value!r}")
    return scale


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


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The settings of one training run, shared by every recipe.

    Attributes:
        recipe: The recipe's name (`RECIPE_DATASETS` sets which datasets it takes).
        policy: One of `tfmp.policies.POLICY_CHOICES` (`"auto"` allowed).
        loss_scale: `"dynamic"` or a fixed positive scale (a number or its string).
        dataset: The dataset's name (`tfmp.data.DATASETS`, of the recipe's kind).
        data_dir: The TFDS data directory, or None.
        batch_size: Global examples per step (each step of an accumulation too).
        epochs: Epochs of the whole run (a resumed run continues to this epoch).
        steps_per_epoch: Steps per epoch, or None for one pass over the data.
        optimizer: The optimizer's settings (`tfmp.optimizer_config.OptimizerConfig`).
        label_smoothing: Label smoothing of the classification loss, in [0, 1).
        jit_compile: `"auto"`, `"true"` or `"false"` (or a bool): `model.compile`'s.
        steps_per_execution: Steps per call into the device; divides `steps_per_epoch`.
        distribution: One of `tfmp.distribute.DISTRIBUTIONS`.
        cpu_replicas: Logical CPU devices for `"mirrored"` without GPUs (>= 1).
        model_dir: The run directory (backups, logs, `config.json`, `model.keras`).
        export_dir: Where to export a float32 SavedModel, or None.
        seed: The random seed (>= 0).
        num_synthetic: Examples per split of a synthetic dataset (>= 1).
    """

    recipe: str = "image_classification"
    policy: str = "mixed_float16"
    loss_scale: str | float = "dynamic"
    dataset: str = "synthetic"
    data_dir: str | None = None
    batch_size: int = 128
    epochs: int = 10
    steps_per_epoch: int | None = None
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    label_smoothing: float = 0.0
    jit_compile: str | bool = "auto"
    steps_per_execution: int = 1
    distribution: str = "none"
    cpu_replicas: int = 1
    model_dir: str | None = None
    export_dir: str | None = None
    seed: int = 0
    num_synthetic: int = 2048

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raises `ValueError` naming the first bad setting, its value and what is allowed."""
        _checks.check(isinstance(self.recipe, str) and bool(self.recipe), "recipe",
                      self.recipe, "a recipe's name")
        policies.validate_policy_name(self.policy)
        parse_loss_scale(self.loss_scale)
        datasets.validate_dataset_name(self.dataset, kind=RECIPE_DATASETS.get(self.recipe))
        _checks.integer("batch_size", self.batch_size)
        _checks.integer("epochs", self.epochs)
        _checks.integer("steps_per_epoch", self.steps_per_epoch, allow_none=True)
        _checks.check(isinstance(self.optimizer, OptimizerConfig), "optimizer", self.optimizer,
                      "an OptimizerConfig")
        _checks.check(isinstance(self.label_smoothing, (int, float)) and not isinstance(
            self.label_smoothing, bool) and 0 <= self.label_smoothing < 1, "label_smoothing",
            self.label_smoothing, "a number in [0, 1)")
        parse_jit_compile(self.jit_compile)
        _checks.integer("steps_per_execution", self.steps_per_execution)
        if self.steps_per_epoch and self.steps_per_epoch % self.steps_per_execution:
            raise ValueError(
                "`steps_per_epoch` must be a multiple of `steps_per_execution` (Keras runs "
                "whole executions: each epoch would run "
                f"{-(-self.steps_per_epoch // self.steps_per_execution) * self.steps_per_execution}"
                f" steps). Received: steps_per_epoch={self.steps_per_epoch}, "
                f"steps_per_execution={self.steps_per_execution}")
        validate_distribution(self.distribution)
        _checks.integer("cpu_replicas", self.cpu_replicas)
        for name in ("data_dir", "model_dir", "export_dir"):
            value = getattr(self, name)
            _checks.check(value is None or (isinstance(value, str) and bool(value)), name,
                          value, "a path or None")
        _checks.integer("seed", self.seed, minimum=0)
        _checks.integer("num_synthetic", self.num_synthetic)

    @property
    def loss_scale_value(self) -> float | None:
        """The fixed loss scale, or None for the dynamic one."""
        return parse_loss_scale(self.loss_scale)

    def replace(self, **changes) -> RunConfig:
        """A copy with `changes` (run settings or optimizer settings, by name), validated."""
        return RunConfig.from_flat({**self.flat(), **changes})

    def flat(self) -> dict[str, Any]:
        """Every setting by its flag name (the optimizer's settings inlined), JSON types."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name != "optimizer"}
        values.update(dataclasses.asdict(self.optimizer))
        values["step_boundaries"] = list(values["step_boundaries"])
        return values

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> RunConfig:
        """A config from settings by flag name (`flat()`'s form, or the flags' values).

        Args:
            values: Run and optimizer settings by name; those left out take their
                defaults.

        Returns:
            The validated config.

        Raises:
            ValueError: for an unknown name or a bad value.
        """
        run_fields = {f.name for f in dataclasses.fields(cls)} - {"optimizer"}
        unknown = sorted(set(values) - run_fields - set(_OPTIMIZER_FIELDS))
        if unknown:
            raise ValueError(f"Unknown settings: {', '.join(unknown)}. Expected some of: "
                             f"{', '.join(sorted(run_fields | set(_OPTIMIZER_FIELDS)))}.")
        optimizer = {k: v for k, v in values.items() if k in _OPTIMIZER_FIELDS}
        if isinstance(optimizer.get("step_boundaries"), list):
            optimizer["step_boundaries"] = tuple(optimizer["step_boundaries"])
        return cls(optimizer=OptimizerConfig(**optimizer),
                   **{k: v for k, v in values.items() if k in run_fields})

    def to_json(self) -> dict[str, Any]:
        """The config as `config.json` records it (`from_json` reads it back)."""
        values = dataclasses.asdict(self)
        values["optimizer"]["step_boundaries"] = list(self.optimizer.step_boundaries)
        return values

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> RunConfig:
        """The config `to_json` recorded."""
        values = dict(values)
        return cls.from_flat({**values.pop("optimizer", {}), **values})


def _choices(values) -> str:
    return ", ".join(values)


# The flags of every recipe: {name: (kind, help)}; defaults are RunConfig's and
# OptimizerConfig's unless the recipe gives its own (`define_flags(**defaults)`).
FLAGS = {
    "policy": (str, f"Dtype policy: {_choices(policies.POLICY_CHOICES)}."),
    "loss_scale": (str, "'dynamic' or a positive number (a fixed scale)."),
    "dataset": (str, "Dataset name (see tfmp.data.DATASETS; of the recipe's kind)."),
    "data_dir": (str, "TFDS data directory."),
    "batch_size": (int, "Global batch size (of each step, also when accumulating)."),
    "epochs": (int, "Epochs of the whole run (a resumed run continues up to it)."),
    "steps_per_epoch": (int, "Steps per epoch (default: one pass over the data)."),
    "optimizer": (str, f"Optimizer: {_choices(optimizer_config.OPTIMIZERS)} (Keras' own)."),
    "learning_rate": (float, "Base learning rate (before --lr_scaling)."),
    "momentum": (float, "SGD's momentum, in [0, 1)."),
    "nesterov": (bool, "SGD with Nesterov momentum."),
    "weight_decay": (float, "Decoupled weight decay (0: none); biases and normalisation "
                     "scales/offsets excluded."),
    "clipnorm": (float, "Clip each gradient to this norm (default: no clipping)."),
    "grad_accum_steps": (int, "Batches whose gradients are averaged into one optimizer step."),
    "lr_schedule": (str, f"Learning-rate schedule: {_choices(optimizer_config.LR_SCHEDULES)}."),
    "warmup_steps": (int, "Linear warm-up from 0 over this many steps."),
    "step_boundaries": (list, "For --lr_schedule=step: the steps at which the rate is "
                        "multiplied by --step_factor (comma-separated)."),
    "step_factor": (float, "For --lr_schedule=step: the factor, in (0, 1)."),
    "lr_scaling": (str, f"{_choices(optimizer_config.LR_SCALINGS)}: linear multiplies the rate "
                   "by batch_size * grad_accum_steps / --reference_batch_size."),
    "reference_batch_size": (int, "The batch size --learning_rate is given for."),
    "label_smoothing": (float, "Label smoothing of the classification loss, in [0, 1)."),
    "jit_compile": (JIT_COMPILE_CHOICES, "XLA-compile the train step: auto (Keras' choice: on "
                    "GPUs, not on CPUs nor under tf.distribute), true or false."),
    "steps_per_execution": (int, "Train steps per call into the device (Keras' "
                            "steps_per_execution; a divisor of --steps_per_epoch)."),
    "distribution": (str, f"One of: {_choices(DISTRIBUTIONS)}."),
    "cpu_replicas": (int, "Logical CPUs for --distribution=mirrored without GPUs."),
    "model_dir": (str, "Run directory: checkpoints (resumed from), TensorBoard logs, "
                  "config.json, model.keras."),
    "export_dir": (str, "Where to write a float32 SavedModel."),
    "seed": (int, "Random seed."),
    "num_synthetic": (int, "Examples per split of a synthetic dataset."),
}


def _defaults() -> dict[str, Any]:
    return {k: v for k, v in RunConfig(dataset="synthetic").flat().items() if k != "recipe"}


def define_flags(**defaults) -> dict:
    """Defines `FLAGS` (at import time of a recipe), with the recipe's own `defaults`.

    Args:
        **defaults: Defaults by flag name that differ from `RunConfig`'s.

    Returns:
        Flag holders by name, for `from_flags`.
    """
    values = {**_defaults(), **defaults}
    definitions = {}
    for name, (kind, help_text) in FLAGS.items():
        default = values[name]
        if kind is list:
            default = [str(v) for v in default] or None
        definitions[name] = (kind, default, help_text)
    return cli.define_flags(definitions, module_name=cli.calling_module())


def from_flags(recipe: str, holders: dict) -> RunConfig:
    """The run configuration of the command line, validated (`ValueError` if bad).

    Args:
        recipe: The recipe's name.
        holders: What `define_flags` returned.

    Returns:
        The `RunConfig`.
    """
    values = cli.flag_values(holders)
    boundaries = values.get("step_boundaries") or []
    try:
        values["step_boundaries"] = tuple(int(b) for b in boundaries)
    except ValueError:
        raise ValueError("`step_boundaries` must be comma-separated integers (steps). "
                         f"Received: step_boundaries={','.join(boundaries)!r}") from None
    if values.get("clipnorm") is None:
        values["clipnorm"] = None
    return RunConfig.from_flat({"recipe": recipe, **values})


def _load(path: str, model_dir: str) -> dict | None:
    try:
        with open(path) as f:
            recorded = json.load(f)
        if not isinstance(recorded, dict):
            raise ValueError("not a JSON object")
        return recorded
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigMismatchError(
            f"`model_dir` has an unreadable {os.path.basename(path)} ({type(e).__name__}: {e}); "
            f"remove it or pass a new --model_dir. Received: model_dir={model_dir!r}") from None


def _mismatch(recorded: dict, current: dict, names, model_dir: str) -> None:
    changed = [n for n in sorted(names) if recorded.get(n) != current.get(n)]
    if changed:
        def listed(values):
            return ", ".join(f"{n}={values.get(n)!r}" for n in changed)

        raise ConfigMismatchError(
            f"`model_dir` holds a run with {listed(recorded)}; this run has {listed(current)}. "
            "Pass the same settings to resume that run, or a new --model_dir for a new run. "
            f"Received: model_dir={model_dir!r}")


def _fixed(flat: dict[str, Any]) -> dict[str, Any]:
    """`flat` with the momentum of an optimizer that has none left out of the comparison."""
    return flat if flat.get("optimizer") == "sgd" else {**flat, "momentum": None}


def record_run(model_dir: str, config: RunConfig, model_args: dict[str, Any], *,
               write: bool = True) -> dict[str, Any]:
    """Records the run in `model_dir/config.json`, or checks it against the run there.

    A first run writes `{"config": ..., "model": ..., "resumes": []}` (atomically).
    A resumed run must have the recorded `RESUME_FIXED` settings and model
    arguments; its other changes are appended to `"resumes"` as `{name: [old,
    new]}`. A run directory of an older tfmp (a `run.json` of model settings, no
    `config.json`) is checked against its `run.json` and then gets a `config.json`.

    Args:
        model_dir: The run directory.
        config: This run's settings.
        model_args: The recipe's model arguments (JSON-serialisable): they define
            the model, so none may change on resume.
        write: Whether this process writes (the chief only).

    Returns:
        What `config.json` holds after this call.

    Raises:
        ConfigMismatchError: (a `ValueError`) naming each setting that differs from
            the recorded run's, or for an unreadable file.
    """
    path = os.path.join(model_dir, CONFIG_FILE)
    model_args = json.loads(json.dumps(model_args))  # as they read back: lists, not tuples
    current = config.flat()
    recorded = _load(path, model_dir)
    if recorded is None:
        legacy = _load(os.path.join(model_dir, LEGACY_RUN_FILE), model_dir)
        if legacy is not None:
            settings = {"recipe": config.recipe, "dataset": config.dataset, **model_args}
            old = legacy.get("model_settings", {})
            _mismatch(old, settings, set(old) | set(settings), model_dir)
        record = {"config": config.to_json(), "model": model_args, "resumes": []}
    else:
        try:
            old_config = RunConfig.from_json(recorded["config"]).flat()
            old_model = dict(recorded["model"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigMismatchError(
                f"`model_dir` has an unreadable {CONFIG_FILE} ({type(e).__name__}: {e}); "
                f"remove it or pass a new --model_dir. Received: model_dir={model_dir!r}"
            ) from None
        _mismatch(_fixed({**old_config, **old_model}), _fixed({**current, **model_args}),
                  set(RESUME_FIXED) | set(old_model) | set(model_args), model_dir)
        changes = {n: [old_config[n], current[n]] for n in current
                   if old_config.get(n) != current[n]}
        record = {"config": config.to_json(), "model": model_args,
                  "resumes": list(recorded.get("resumes", [])) + [changes]}
    if write:
        os.makedirs(model_dir, exist_ok=True)
        _io.write_json_atomically(path, record)  # fsynced, renamed
    return record
