"""`GuardedState`: non-trainable variables set back on a skipped step (`keras.ops`, every backend).

A forward pass updates non-trainable state before the optimizer sees the
gradients: one NaN pixel writes NaN into every batch-normalisation
`moving_mean`/`moving_variance`. `LossScaleOptimizer.guard_state` keeps such
variables here; on every skipped step they are set back to their values from
before the step.

Example:

    guarded = GuardedState()
    guarded.guard(model)          # its non-trainable variables, also later ones
    guarded.restore(finite)       # in the optimizer's apply, every step
"""

from __future__ import annotations

import contextlib
import weakref

import keras
from keras import ops


class GuardedState:
    """Shadow copies of variables, restored on a skipped step and refreshed on an applied one.

    Cost: one copy of the guarded variables (a frozen layer's weights included),
    and per step one `where` and two assignments each. Under `tf.distribute`
    each replica keeps and restores its own copy (batch-norm statistics are
    per replica). Variables a guarded layer creates later (a model built by its
    first batch) are guarded from the first traced or eager step that sees
    them, their shadows starting from their current values.
    """

    def __init__(self):
        self._pairs: list[tuple[keras.Variable, keras.Variable]] = []
        self._layers: list[weakref.ref] = []

    @property
    def variables(self) -> list:
        """The guarded variables."""
        return [v for v, _ in self._pairs]

    def guard(self, variables) -> bool:
        """Guards a layer's non-trainable variables (now and later) or a list of variables.

        Args:
            variables: A `keras.layers.Layer` (a model) or an iterable of variables.
                Variables already guarded are kept once; non-Keras variables are
                ignored.

        Returns:
            Whether anything new is guarded.
        """
        new = False
        if isinstance(variables, keras.layers.Layer):
            if not self.guards(variables):
                self._layers.append(weakref.ref(variables))
                new = True
            variables = variables.non_trainable_variables
        added = self._add(variables)
        if added:
            self.sync()
        return new or added

    def guards(self, layer: keras.layers.Layer) -> bool:
        """Whether `layer` itself was given to `guard` (its variables, now and later)."""
        return any(ref() is layer for ref in self._layers)

    def _add(self, variables) -> bool:
        known = {id(v) for v, _ in self._pairs}
        added = False
        for v in variables:
            if id(v) in known or not isinstance(v, keras.Variable):
                continue
            known.add(id(v))
            self._pairs.append((v, _shadow(v)))
            added = True
        return added

    def sync(self) -> None:
        """Copies the current values into the shadows (eagerly; under `tf.distribute`
        each replica copies its own). Call it after loading weights outside `fit`."""
        def copy():
            for v, shadow in self._pairs:
                shadow.assign(v.value)

        strategy = _strategy_of(self._pairs[0][0]) if self._pairs else None
        if strategy is None:
            copy()
        else:
            strategy.run(copy)

    def restore(self, finite) -> None:
        """Keeps the step's values where `finite`, else sets back the shadows' (replica context)."""
        for ref in self._layers:
            layer = ref()
            if layer is not None:
                self._add(layer.non_trainable_variables)
        for v, shadow in self._pairs:
            value = ops.where(finite, v.value, shadow.value)
            v.assign(value)
            shadow.assign(value)


def guard_jax_train_step(model: keras.Model) -> bool:
    """Wraps a JAX model's `train_step` to keep its non-trainable state on skipped steps.

    Keras' JAX `fit` is stateless: `train_step(state, data)` returns the
    non-trainable values of the forward pass (NaN batch-norm statistics after a
    NaN batch) beside the optimizer's, so the optimizer cannot set them back.
    While the model's optimizer (read when the step is traced) is one that
    guards the model, the wrapper compares its skipped-step count before and
    after the step and returns, on a skipped step, the non-trainable values it
    was given; with any other optimizer (the model compiled again) the step is
    Keras' own.

    Args:
        model: The model whose `fit` runs on JAX.

    Returns:
        Whether the wrapper is new (False: already wrapped).

    Example:

        guard_jax_train_step(model)   # done by `opt.guard_state(model)`
    """
    step = model.train_step
    if getattr(step, "_tfmp_guarded", False):
        return False

    def train_step(state, data):
        opt = model.optimizer
        guarded = getattr(opt, "_guarded", None)
        if not isinstance(guarded, GuardedState) or not guarded.guards(model):
            return step(state, data)
        index = [id(v) for v in opt.variables].index(id(opt.skipped_steps))
        _, old_non_trainable, old_optimizer, _ = state
        logs, (trainable, non_trainable, optimizer, metrics) = step(state, data)
        applied = ops.equal(optimizer[index], old_optimizer[index])
        non_trainable = [ops.where(applied, new, old)
                         for old, new in zip(old_non_trainable, non_trainable, strict=True)]
        return logs, (trainable, non_trainable, optimizer, metrics)

    train_step._tfmp_guarded = True
    object.__setattr__(model, "train_step", train_step)  # not a tracked attribute
    return True


def _strategy_of(v):
    """The `tf.distribute` strategy a variable was made under, if any (duck-typed)."""
    return getattr(v.value, "_distribute_strategy", None)


def _shadow(v):
    strategy = _strategy_of(v)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        return keras.Variable(
            lambda shape, dtype: ops.copy(v.value), shape=v.shape, dtype=v.dtype,
            trainable=False, autocast=False, aggregation=v.aggregation,
            synchronization=getattr(v, "synchronization", "auto"),
            name=f"{v.name}_before_step")
