"""Argument checks for tfmp's constructors: a `ValueError` naming the argument, the value
received and what is allowed."""

from __future__ import annotations

import numbers

import keras
import numpy as np


def check(condition: bool, argument: str, value, allowed: str) -> None:
    """Raises `ValueError("`argument` must be <allowed>. Received: argument=<value>")`."""
    if not condition:
        raise ValueError(f"`{argument}` must be {allowed}. Received: {argument}={value!r}")


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def number(argument: str, value) -> float:
    """A real number (numpy scalars too, not bools) as a Python float."""
    check(isinstance(value, numbers.Real) and not _is_bool(value), argument, value, "a number")
    return float(value)


def integer(argument: str, value, minimum: int = 1, allow_none: bool = False) -> int | None:
    """An integer >= `minimum` (numpy integers too, not bools) as a Python int, or None
    where `allow_none`."""
    if allow_none and value is None:
        return None
    check(isinstance(value, numbers.Integral) and not _is_bool(value) and value >= minimum,
          argument, value, f"an integer >= {minimum}{' or None' if allow_none else ''}")
    return int(value)


def boolean(argument: str, value) -> bool:
    """True or False (numpy bools too); no other truthy values."""
    check(_is_bool(value), argument, value, "True or False")
    return bool(value)


def check_inner_optimizer(inner_optimizer) -> None:
    """A Keras optimizer that is not a LossScaleOptimizer and has no live tfmp wrapper."""
    if isinstance(inner_optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError(
            "`inner_optimizer` is already a LossScaleOptimizer and cannot be wrapped "
            f"again. Received: inner_optimizer={inner_optimizer!r}; pass the optimizer "
            "it wraps instead.")
    check(isinstance(inner_optimizer, keras.optimizers.Optimizer),
          "inner_optimizer", inner_optimizer, "a `keras.optimizers.Optimizer` instance")
    owner = getattr(inner_optimizer, "_tfmp_wrapper", None)
    if owner is not None and owner() is not None:
        raise ValueError(
            "`inner_optimizer` is already wrapped by another LossScaleOptimizer "
            f"({owner().name!r}); two wrappers would both update its variables. Received: "
            f"inner_optimizer={inner_optimizer!r}; create a new inner optimizer instead.")
