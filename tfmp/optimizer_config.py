"""The optimizer a run trains with, from named settings (`keras.ops` only, every backend).

`OptimizerConfig` holds the settings (optimizer, learning rate and schedule,
momentum, weight decay, clipping, gradient accumulation) and validates them in
one place; `make_optimizer(config, ...)` builds Keras' own optimizer with a
Keras `LearningRateSchedule` and wraps it in `tfmp.LossScaleOptimizer` with the
settings that suit the policy: loss scaling under `mixed_float16` only,
non-finite steps skipped under every policy.

- Weight decay is Keras' (decoupled: `w -= lr * weight_decay * w`, for every
  optimizer) and leaves out biases and normalisation scales and offsets
  (variables named `bias`, `gamma`, `beta`, `scale`), as Model Garden's and the
  BERT/ResNet references do.
- The schedule reads the inner optimizer's `iterations`, which counts applied
  steps only: a skipped (non-finite) step does not advance it.
- Gradient accumulation is Keras' `gradient_accumulation_steps`: the weights
  move every `grad_accum_steps` batches, by the mean of their gradients.

Example:

    config = OptimizerConfig(optimizer="sgd", learning_rate=0.256, momentum=0.875,
                             weight_decay=3.05e-5, lr_schedule="cosine", warmup_steps=500,
                             lr_scaling="linear")
    opt = make_optimizer(config, policy="mixed_float16", total_steps=100_000,
                         global_batch_size=1024)     # base rate 0.256 * 1024 / 256
"""

from __future__ import annotations

import dataclasses
import math

import keras

from tfmp import _checks
from tfmp.optimizers import LossScaleOptimizer

LearningRateSchedule = keras.optimizers.schedules.LearningRateSchedule
OPTIMIZERS = ("sgd", "adam", "adamw", "lamb")
LR_SCHEDULES = ("constant", "cosine", "step")
LR_SCALINGS = ("none", "linear")
# Variable names left out of weight decay: biases, normalisation scales and offsets.
NO_DECAY_NAMES = ("bias", "gamma", "beta", "scale")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer settings of a run.

    Attributes:
        optimizer: One of `OPTIMIZERS` (Keras' SGD, Adam, AdamW, Lamb).
        learning_rate: The base rate (before `lr_scaling`), > 0.
        momentum: SGD's momentum in [0, 1) (ignored by the others).
        nesterov: SGD with Nesterov momentum.
        weight_decay: Decoupled weight decay >= 0 (0: none), not on `NO_DECAY_NAMES`.
        clipnorm: Clip each gradient to this norm (> 0), or None.
        grad_accum_steps: Batches whose gradients are averaged into one step (>= 1).
        lr_schedule: One of `LR_SCHEDULES`: constant, cosine decay to 0, or steps.
        warmup_steps: Linear warm-up from 0 over this many steps (>= 0).
        step_boundaries: For `"step"`: the steps at which the rate is multiplied by
            `step_factor` (increasing, positive).
        step_factor: For `"step"`: the factor in (0, 1).
        lr_scaling: `"linear"`: the base rate is multiplied by
            `global_batch_size / reference_batch_size`; `"none"`: used as given.
        reference_batch_size: The batch size `learning_rate` is given for (>= 1).
    """

    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    clipnorm: float | None = None
    grad_accum_steps: int = 1
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    step_boundaries: tuple[int, ...] = ()
    step_factor: float = 0.1
    lr_scaling: str = "none"
    reference_batch_size: int = 256

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raises `ValueError` naming the first bad setting, its value and what is allowed."""
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("lr_scaling", self.lr_scaling, LR_SCALINGS)
        _number("learning_rate", self.learning_rate, "a positive finite number",
                lambda v: 0 < v < math.inf)
        _number("momentum", self.momentum, "a number in [0, 1)", lambda v: 0 <= v < 1)
        _number("weight_decay", self.weight_decay, "a finite number >= 0",
                lambda v: 0 <= v < math.inf)
        if self.clipnorm is not None:
            _number("clipnorm", self.clipnorm, "a positive finite number or None",
                    lambda v: 0 < v < math.inf)
        _number("step_factor", self.step_factor, "a number in (0, 1)", lambda v: 0 < v < 1)
        _checks.boolean("nesterov", self.nesterov)
        _checks.integer("grad_accum_steps", self.grad_accum_steps, minimum=1)
        _checks.integer("warmup_steps", self.warmup_steps, minimum=0)
        _checks.integer("reference_batch_size", self.reference_batch_size, minimum=1)
        boundaries = self.step_boundaries
        if not isinstance(boundaries, tuple) or not all(
                isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in boundaries) or (
                list(boundaries) != sorted(set(boundaries))):
            raise ValueError(
                "`step_boundaries` must be a tuple of increasing positive integers (steps). "
                f"Received: step_boundaries={boundaries!r}")
        if self.lr_schedule == "step" and not boundaries:
            raise ValueError("`lr_schedule='step'` needs `step_boundaries` (the steps at which "
                             "the rate drops). Received: step_boundaries=()")

    def base_learning_rate(self, global_batch_size: int) -> float:
        """The rate after `lr_scaling` for `global_batch_size` examples per step."""
        if self.lr_scaling == "linear":
            return self.learning_rate * global_batch_size / self.reference_batch_size
        return self.learning_rate


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    _checks.check(value in allowed, name, value, f"one of {', '.join(allowed)}")


def _number(name: str, value, allowed: str, ok) -> None:
    _checks.check(isinstance(value, (int, float)) and not isinstance(value, bool) and ok(value),
                  name, value, allowed)


@keras.saving.register_keras_serializable(package="tfmp")
class WarmUp(LearningRateSchedule):
    """Linear warm-up from 0 to the rate after it over `warmup_steps`, then `schedule`.

    Args:
        schedule: The schedule after the warm-up (a `LearningRateSchedule`, called
            with the step counted from the warm-up's end), or a constant rate.
        warmup_steps: Steps of warm-up (>= 1).

    Example:

        WarmUp(keras.optimizers.schedules.PiecewiseConstantDecay([100], [0.1, 0.01]), 10)
    """

    def __init__(self, schedule, warmup_steps: int):
        _checks.integer("warmup_steps", warmup_steps, minimum=1)
        self.schedule = schedule
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warmup = float(self.warmup_steps)
        after = (self.schedule(keras.ops.maximum(step - warmup, 0.0))
                 if callable(self.schedule) else self.schedule)
        after = keras.ops.cast(after, "float32")
        return keras.ops.where(step < warmup, after * step / warmup, after)

    def get_config(self):
        schedule = (keras.saving.serialize_keras_object(self.schedule)
                    if callable(self.schedule) else float(self.schedule))
        return {"schedule": schedule, "warmup_steps": self.warmup_steps}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config["schedule"], dict):
            config["schedule"] = keras.saving.deserialize_keras_object(config["schedule"])
        return cls(**config)


def learning_rate_schedule(config: OptimizerConfig, *, total_steps: int | None,
                           global_batch_size: int) -> LearningRateSchedule | float:
    """The learning-rate schedule of `config` for a run of `total_steps` optimizer steps.

    Args:
        config: The settings.
        total_steps: Optimizer steps of the whole run (after accumulation), >
            `warmup_steps`; None only for a constant rate without warm-up.
        global_batch_size: Examples per step over all replicas (for `lr_scaling`).

    Returns:
        A Keras `LearningRateSchedule` (serialisable with the optimizer), or the
        rate itself (a float) for a constant rate without warm-up.

    Raises:
        ValueError: `total_steps` not above `warmup_steps`, or a step boundary past it.
    """
    _checks.integer("global_batch_size", global_batch_size, minimum=1)
    base = config.base_learning_rate(global_batch_size)
    if config.lr_schedule == "constant" and not config.warmup_steps:
        return base
    _checks.integer("total_steps", total_steps, minimum=1)
    if total_steps <= config.warmup_steps:
        raise ValueError(f"`warmup_steps` ({config.warmup_steps}) must be below the run's "
                         f"optimizer steps. Received: total_steps={total_steps}")
    decay_steps = total_steps - config.warmup_steps
    schedules = keras.optimizers.schedules
    if config.lr_schedule == "cosine":
        schedule = schedules.CosineDecay(base, decay_steps, alpha=0.0)
    elif config.lr_schedule == "step":
        if config.step_boundaries[-1] >= total_steps:
            raise ValueError(f"`step_boundaries` must be below the run's {total_steps} steps. "
                             f"Received: step_boundaries={config.step_boundaries!r}")
        values = [base * config.step_factor**i for i in range(len(config.step_boundaries) + 1)]
        # Boundaries count from the start of the run; the schedule after warm-up from its end.
        schedule = schedules.PiecewiseConstantDecay(
            [max(b - config.warmup_steps, 0) for b in config.step_boundaries], values)
    else:
        schedule = base  # constant, after a warm-up
    return WarmUp(schedule, config.warmup_steps) if config.warmup_steps else schedule


def make_inner_optimizer(config: OptimizerConfig, *, total_steps: int | None,
                         global_batch_size: int) -> keras.optimizers.Optimizer:
    """Keras' optimizer of `config`, with its schedule, weight decay and clipping.

    Args:
        config: The settings.
        total_steps: Optimizer steps of the whole run (None: a constant rate only).
        global_batch_size: Examples per step over all replicas.

    Returns:
        A `keras.optimizers.SGD`, `Adam`, `AdamW` or `Lamb`.
    """
    common = dict(
        learning_rate=learning_rate_schedule(config, total_steps=total_steps,
                                             global_batch_size=global_batch_size),
        weight_decay=config.weight_decay or None, clipnorm=config.clipnorm,
        gradient_accumulation_steps=(config.grad_accum_steps if config.grad_accum_steps > 1
                                     else None))
    if config.optimizer == "sgd":
        inner = keras.optimizers.SGD(momentum=config.momentum, nesterov=config.nesterov,
                                     **common)
    elif config.optimizer == "adam":
        inner = keras.optimizers.Adam(**common)
    elif config.optimizer == "adamw":
        common["weight_decay"] = config.weight_decay  # AdamW's default would be 0.004
        inner = keras.optimizers.AdamW(**common)
    else:
        inner = keras.optimizers.Lamb(**common)
    if config.weight_decay:
        # Keras matches `variable.name`: "bias" on JAX/PyTorch, "dense/bias:0" inside a
        # TensorFlow apply (the tf.Variable's name).
        inner.exclude_from_weight_decay(
            var_names=[rf"(^|/)({'|'.join(NO_DECAY_NAMES)})(:\d+)?$"])
    return inner


def make_optimizer(config: OptimizerConfig, *, policy: str, total_steps: int | None,
                   global_batch_size: int, loss_scale: float | None = None
                   ) -> LossScaleOptimizer:
    """`make_inner_optimizer(config)` wrapped in `tfmp.LossScaleOptimizer` for `policy`.

    Args:
        config: The settings.
        policy: The resolved policy name: scaling under `mixed_float16` only;
            non-finite steps are skipped under every policy.
        total_steps: Optimizer steps of the whole run (None: a constant rate only).
        global_batch_size: Examples per step over all replicas.
        loss_scale: A fixed loss scale, or None for the dynamic one.

    Returns:
        A `tfmp.LossScaleOptimizer`.
    """
    inner = make_inner_optimizer(config, total_steps=total_steps,
                                 global_batch_size=global_batch_size)
    kwargs = {} if loss_scale is None else {
        "initial_scale": loss_scale, "dynamic": False,
        "min_scale": min(1.0, loss_scale), "max_scale": max(2.0**24, loss_scale)}
    return LossScaleOptimizer(inner, enabled=policy == "mixed_float16", skip_nonfinite=True,
                              **kwargs)
