"""The loss-scale state and its pure transition (`keras.ops`, every backend).

`LossScaleOptimizer` keeps a `LossScaleState` in variables and calls
`next_state` once a step, on the stateful path (`apply`) and on the stateless
one (`stateless_apply`) alike.

Example:

    rule = ScaleRule(dynamic=True, growth_steps=2000)
    state = next_state(finite, state, rule)
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from keras import ops


class LossScaleState(NamedTuple):
    """What the optimizer remembers between steps (one scalar each).

    Attributes:
        step_counter: Finite steps since the scale last grew or since the last
            non-finite step (int64); the scale grows when it reaches
            `dynamic_growth_steps`.
        loss_scale: The current loss scale (float32), always in
            `[min_scale, max_scale]`.
        hysteresis_left: Non-finite steps still tolerated before the scale is
            lowered (int64); reset to `hysteresis` on every growth.
        skipped_steps: Total steps skipped for non-finite gradients (int64).
        consecutive_skipped: Steps skipped in a row (int64; 0 after an applied step).
    """

    step_counter: Any
    loss_scale: Any
    hysteresis_left: Any
    skipped_steps: Any
    consecutive_skipped: Any


# Variable dtypes, in the order the optimizer creates (and saves) them ("int" is
# Keras' default integer, int64: as saved by tfmp 0.1, so its checkpoints restore).
STATE_DTYPES = LossScaleState("int", "float32", "int", "int", "int")


@dataclasses.dataclass(frozen=True)
class ScaleRule:
    """How the scale moves.

    Attributes:
        dynamic: Whether the scale changes at all (False: fixed, or not scaling).
        growth_steps: Finite steps in a row after which the scale grows.
        growth_factor: Factor (> 1) applied on growth.
        backoff_factor: Factor in (0, 1) applied when the scale is lowered.
        min_scale: Smallest scale.
        max_scale: Largest scale.
        hysteresis: Non-finite steps since the last growth before the scale is lowered.
    """

    dynamic: bool = True
    growth_steps: int = 2000
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    min_scale: float = 1.0
    max_scale: float = 2.0**24
    hysteresis: int = 1


def next_state(finite, state: LossScaleState, rule: ScaleRule) -> LossScaleState:
    """The state after one step whose gradients were `finite` (a boolean scalar).

    Args:
        finite: Whether the step's gradients passed the check (and were applied).
        state: The state before the step.
        rule: How the scale moves.

    Returns:
        The new `LossScaleState` (tensors of the same dtypes).
    """
    counter, scale, hyst_left, skipped, consecutive = state
    not_finite = ops.logical_not(finite)
    one = ops.ones_like(counter)
    skipped = ops.where(finite, skipped, skipped + one)
    consecutive = ops.where(finite, ops.zeros_like(consecutive), consecutive + one)
    if not rule.dynamic:
        return LossScaleState(ops.zeros_like(counter), scale, hyst_left, skipped, consecutive)
    grow = ops.logical_and(finite, ops.greater_equal(counter + one, rule.growth_steps))
    lower = ops.logical_and(not_finite, ops.less_equal(hyst_left, 1))
    new_scale = ops.where(
        grow,
        ops.minimum(scale * rule.growth_factor, rule.max_scale),
        ops.where(lower, ops.maximum(scale * rule.backoff_factor, rule.min_scale), scale),
    )
    reset = ops.logical_or(grow, not_finite)
    counter = ops.where(reset, ops.zeros_like(counter), counter + one)
    hyst_left = ops.where(
        grow,
        ops.full_like(hyst_left, rule.hysteresis),
        ops.where(ops.logical_and(not_finite, ops.greater(hyst_left, 1)), hyst_left - one,
                  hyst_left),
    )
    return LossScaleState(counter, ops.cast(new_scale, "float32"), hyst_left, skipped,
                          consecutive)
