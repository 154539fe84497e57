"""`LossScaleOptimizer`: Keras' loss scaling, bounded, and safe for every model variable.

The core update is written with `keras.ops` and works on every Keras backend;
the `tf.distribute` path is in `_tf_apply` and says so. The state and its pure
transition are in `tfmp.loss_scale`, the gradient check in `tfmp._numerics`.
"""

from __future__ import annotations

import weakref

import keras
import numpy as np
from keras import ops

from tfmp import _checks, _numerics
from tfmp.guarded_state import GuardedState, guard_jax_train_step
from tfmp.loss_scale import STATE_DTYPES, LossScaleState, ScaleRule, next_state

_STATE_NAMES = ("step_counter", "dynamic_scale", "hysteresis_left", "skipped_steps",
                "consecutive_skipped")  # variable names, as saved since tfmp 0.1


def _can_assign(value) -> bool:
    """Whether a variable may be assigned here: not in Keras' stateless scope (JAX
    `fit`), nor while `jax.jit` traces `value` (a tracer must not reach a variable)."""
    from keras.src.backend.common import stateless_scope

    if stateless_scope.in_stateless_scope():
        return False
    if keras.backend.backend() == "jax":
        import jax

        return not isinstance(value, jax.core.Tracer)
    return True


@keras.saving.register_keras_serializable(package="tfmp")
class LossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Loss scaling (dynamic or fixed) that never writes a non-finite value into the model.

    A drop-in subclass of `keras.optimizers.LossScaleOptimizer`. Over Keras' class it
    bounds the scale to `[min_scale, max_scale]` (Keras' doubles to `inf` and halves
    to 0), decides skip-or-apply from the gradients of *all* replicas under
    `tf.distribute` (Keras' checks replica 0 only), checks that the update itself
    stays finite (not only the gradients), skips non-finite steps under every
    policy (also without scaling), can restore the model's non-trainable state
    on a skipped step (`guard_state`), supports a fixed scale (`dynamic=False`),
    DeepSpeed-style hysteresis and the tf-keras custom-loop API
    (`get_scaled_loss`, `get_unscaled_gradients`), and exposes counters.

    The algorithm, for each call of `apply(grads)`:

        g = grads / scale  (in float32)       # unless enabled=False, or already unscaled
        if tf.distribute: g = all_reduce_sum(g)   # before the check and the clipping
        n_i = sum(g_i ** 2) in float32        # per variable; sparse: on the values
        finite = isfinite(sum_i n_i)          # every element, square and the global norm
        #  (float16 gradients: also sum of n_i over them <= 65504, float16's largest)
        if not (skip_nonfinite or enabled): finite = True
        if finite:
            inner_optimizer.apply(g)          # clipping, weight decay, EMA, accumulation
            consecutive_skipped = 0
            step_counter += 1
            if dynamic and step_counter == dynamic_growth_steps:
                scale = min(scale * growth_factor, max_scale)
                step_counter = 0
                hysteresis_left = hysteresis
        else:                                 # weights and inner state untouched
            guarded_state = its values before the step   # see `guard_state`
            skipped_steps += 1; consecutive_skipped += 1
            step_counter = 0
            if dynamic:
                if hysteresis_left <= 1:
                    scale = max(scale * backoff_factor, min_scale)
                else:
                    hysteresis_left -= 1

    Why squares: a finite gradient such as `[1e20, 1e20]` has a finite sum but an
    infinite squared norm, and `global_clipnorm`, `clipnorm` and Adam's second
    moment compute exactly that. When the squared global norm is finite, every
    square and every clipping norm is, so Keras' optimizers (SGD with momentum,
    Adam, AdamW, ...; with clipping, weight decay, EMA and gradient accumulation)
    keep finite weights and slots for finite learning rates and weights.

    `iterations` counts applied steps only, so learning-rate schedules do not
    advance on skipped steps.

    Args:
        inner_optimizer: The `keras.optimizers.Optimizer` to wrap (not itself a
            `LossScaleOptimizer`, nor already wrapped by another one). Under
            `tf.distribute` the wrapper all-reduces the gradients, so the inner
            optimizer must only be used through it.
        initial_scale: The starting loss scale, in `[min_scale, max_scale]`.
        dynamic_growth_steps: Finite steps in a row after which the scale grows;
            None for the default (2000). Must be None (or 2000) with `dynamic=False`,
            and reads as None then, as in tf-keras.
        dynamic: If False, the scale stays at `initial_scale` for good;
            non-finite steps are still skipped.
        growth_factor: Factor (> 1) applied on growth.
        backoff_factor: Factor in (0, 1) applied when the scale is lowered.
        min_scale: Smallest scale (> 0).
        max_scale: Largest scale (finite, >= min_scale).
        hysteresis: Non-finite steps (>= 1) since the last growth before the
            scale is lowered; each is still skipped.
        enabled: Whether to scale the loss (float16 needs it; bfloat16 and
            float32 do not). With `enabled=False` the scale is 1.
        skip_nonfinite: Whether to skip steps whose update would be non-finite.
            Independent of `enabled`: keep it True under every policy (as optax'
            `apply_if_finite` does for bfloat16). False with `enabled=False`
            passes the gradients straight to the inner optimizer.
        name: Optional name.

    Example:

        opt = tfmp.LossScaleOptimizer(keras.optimizers.Adam(1e-3))
        model.compile(optimizer=opt, loss="mse")
        opt.guard_state(model)         # batch-norm statistics survive a NaN batch
        model.fit(x, y)
        print(opt.stats())             # {'loss_scale': 32768.0, 'skipped_steps': 0, ...}

    In a custom loop (tf-keras style):

        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x))
            scaled_loss = opt.get_scaled_loss(loss)
        grads = opt.get_unscaled_gradients(tape.gradient(scaled_loss, model.trainable_variables))
        opt.apply_gradients(zip(grads, model.trainable_variables))
    """

    def __init__(
        self,
        inner_optimizer,
        initial_scale: float = 2.0**15,
        dynamic_growth_steps: int | None = None,
        *,
        dynamic: bool = True,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        min_scale: float = 1.0,
        max_scale: float = 2.0**24,
        hysteresis: int = 1,
        enabled: bool = True,
        skip_nonfinite: bool = True,
        name: str | None = None,
        **kwargs,
    ):
        _checks.check_inner_optimizer(inner_optimizer)
        numbers_ = {arg: _checks.number(arg, value) for arg, value in (
            ("initial_scale", initial_scale), ("growth_factor", growth_factor),
            ("backoff_factor", backoff_factor), ("min_scale", min_scale),
            ("max_scale", max_scale))}
        for argument in ("initial_scale", "min_scale", "max_scale"):
            # The scale lives in a float32 variable: 1e-46 would be stored as 0.
            value = numbers_[argument]
            _checks.check(_numerics.FLOAT32_TINY <= value <= _numerics.FLOAT32_MAX, argument, value,
                   f"in float32's normal range [{_numerics.FLOAT32_TINY:.4g}, "
                   f"{_numerics.FLOAT32_MAX:.4g}]")
        initial_scale, min_scale, max_scale = (
            numbers_["initial_scale"], numbers_["min_scale"], numbers_["max_scale"])
        _checks.check(numbers_["growth_factor"] > 1, "growth_factor", growth_factor, "> 1")
        _checks.check(0 < numbers_["backoff_factor"] < 1, "backoff_factor", backoff_factor,
                      "in (0, 1)")
        _checks.check(min_scale <= max_scale, "min_scale", min_scale, f"<= max_scale ({max_scale})")
        _checks.check(min_scale <= initial_scale <= max_scale, "initial_scale", initial_scale,
               f"in [min_scale, max_scale] = [{min_scale}, {max_scale}]")
        dynamic = _checks.boolean("dynamic", dynamic)
        if dynamic_growth_steps is None:
            growth_steps = 2000
        else:
            growth_steps = _checks.integer("dynamic_growth_steps", dynamic_growth_steps)
            _checks.check(dynamic or growth_steps == 2000, "dynamic_growth_steps",
                   dynamic_growth_steps, "None with dynamic=False (a fixed scale never grows)")
        hysteresis = _checks.integer("hysteresis", hysteresis)
        enabled = _checks.boolean("enabled", enabled)
        skip_nonfinite = _checks.boolean("skip_nonfinite", skip_nonfinite)
        _checks.check(skip_nonfinite or not enabled, "skip_nonfinite", skip_nonfinite,
               "True when enabled=True (a scaled step that overflows must be skipped, and the "
               "scale lowered)")
        super().__init__(inner_optimizer, initial_scale, growth_steps, name=name, **kwargs)
        inner_optimizer._tfmp_wrapper = weakref.ref(self)
        self.initial_scale = initial_scale
        self.dynamic_growth_steps = growth_steps if dynamic else None
        self.dynamic = dynamic
        self.growth_factor = numbers_["growth_factor"]
        self.backoff_factor = numbers_["backoff_factor"]
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.hysteresis = hysteresis
        self.enabled = enabled
        self.skip_nonfinite = skip_nonfinite
        self._make_variables()
        if keras.backend.backend() == "tensorflow":
            # The wrapper all-reduces before checking and unscaling, so the inner
            # optimizer must not sum the (already summed) gradients again.
            inner_optimizer._all_reduce_sum_gradients = list

    # ----------------------------------------------------------------- state
    def _make_variables(self):
        """Creates the state at construction, so a `tf.function` traced before the
        first apply reads the variables (not the initial numbers)."""
        with keras.name_scope(self.name, caller=self):
            # Saved by tfmp 0.1 at this position, so kept for the files' layout; unused
            # (the flag is now `_unscaled_this_step`, one per replica, not saved).
            self.grads_unscaled = keras.Variable(  # an initializer: a buffer of its own
                keras.initializers.Zeros(), shape=(), name="grads_unscaled", dtype="int32",
                trainable=False, aggregation="only_first_replica")  # tracked on assignment
        initial = {"dynamic_scale": self.initial_scale, "hysteresis_left": self.hysteresis}
        self._state_vars = LossScaleState(*[
            self.add_variable(
                shape=(), dtype=dtype, name=name, aggregation="only_first_replica",
                initializer=keras.initializers.Constant(initial.get(name, 0)))
            for name, dtype in zip(_STATE_NAMES, STATE_DTYPES, strict=True)
        ])
        # Keras' class names these two; they stay readable under the same names.
        self.step_counter = self._state_vars.step_counter
        self.dynamic_scale = self._state_vars.loss_scale
        # Not saved (transient, or counts of this process only): kept out of the
        # optimizer's variable list so that saved files keep their layout.
        with keras.name_scope(self.name, caller=self):
            untracked = {
                # 1 once `get_unscaled_gradients` ran in this step: set back to 0 by
                # `scale_loss` (a new step) and by `apply` (the step is done).
                "_unscaled_this_step": ("int32", "only_first_replica", "on_read"),
                # 1 when the loss last given to `scale_loss` on this replica was non-finite.
                "_loss_nonfinite": ("int32", "only_first_replica", "on_read"),
                # Skipped steps whose loss was non-finite (data or forward pass).
                "_nonfinite_loss_steps": ("int32", "only_first_replica", "auto"),
            }
            for attr, (dtype, aggregation, sync) in untracked.items():
                object.__setattr__(self, attr, keras.Variable(
                    keras.initializers.Zeros(), shape=(), dtype=dtype, trainable=False,
                    name=attr.strip("_"), aggregation=aggregation, synchronization=sync))
        object.__setattr__(self, "_guarded", GuardedState())

    @keras.src.utils.tracking.no_automatic_dependency_tracking
    def build(self, var_list):
        # 1 where the variable's gradient was non-finite on the last step.
        self.nonfinite_mask = self.add_variable(
            shape=(len(var_list),), dtype="int32", name="nonfinite_mask",
            initializer="zeros", aggregation="only_first_replica",
        )
        self.inner_optimizer.build(var_list)
        keras.optimizers.Optimizer.build(self, var_list)

    @property
    def state(self) -> LossScaleState:
        """The loss-scale state, as variables (see `tfmp.loss_scale.LossScaleState`)."""
        return self._state_vars

    @property
    def loss_scale(self):
        """The current loss scale: a float32 scalar variable (1.0 when `enabled=False`)."""
        return self.dynamic_scale if self.enabled else 1.0

    @property
    def skipped_steps(self):
        """Total number of steps skipped for non-finite updates."""
        return self._state_vars.skipped_steps

    @property
    def consecutive_skipped_steps(self):
        """Steps skipped in a row up to now (0 after an applied step)."""
        return self._state_vars.consecutive_skipped

    @property
    def last_step_skipped(self):
        """Whether the last step was skipped (a boolean tensor)."""
        return ops.greater(self._state_vars.consecutive_skipped, 0)

    @property
    def nonfinite_loss_steps(self):
        """Skipped steps whose loss (as given to `scale_loss`) was itself non-finite.

        Such a step was not a loss-scale overflow: the data or the forward pass
        held inf/NaN. Counted in this process (not saved).
        """
        return self._nonfinite_loss_steps

    def stats(self) -> dict:
        """The counters as Python numbers, for logs and callbacks.

        Returns:
            `loss_scale` (float), `skipped_steps`, `consecutive_skipped_steps`,
            `nonfinite_loss_steps` and `iterations` (applied steps) as ints.
        """
        def value(x):
            return np.asarray(ops.convert_to_numpy(x)).item()

        return {
            "loss_scale": float(value(self.loss_scale)),
            "skipped_steps": int(value(self.skipped_steps)),
            "consecutive_skipped_steps": int(value(self.consecutive_skipped_steps)),
            "nonfinite_loss_steps": int(value(self.nonfinite_loss_steps)),
            "iterations": int(value(self.iterations)),
        }

    def nonfinite_variables(self) -> list[str]:
        """Paths of the variables whose gradients were non-finite on the last step."""
        if not self.built:
            return []
        mask = ops.convert_to_numpy(self.nonfinite_mask)
        return [v.path for v, bad in zip(self._trainable_variables, mask, strict=True) if bad]

    @property
    def _rule(self) -> ScaleRule:
        return ScaleRule(
            dynamic=self.dynamic and self.enabled,
            growth_steps=self.dynamic_growth_steps or 2000, growth_factor=self.growth_factor,
            backoff_factor=self.backoff_factor, min_scale=self.min_scale,
            max_scale=self.max_scale, hysteresis=self.hysteresis)

    def _next_state(self, finite, state):
        """Pure state transition for one step (see `tfmp.loss_scale.next_state`)."""
        return next_state(finite, LossScaleState(*state), self._rule)

    # ------------------------------------------------------ guarded state
    def guard_state(self, variables) -> bool:
        """Restores `variables` to their values before the step on every skipped step.

        See `tfmp.guarded_state.GuardedState` for how, and what it costs. Call it
        eagerly, before the train step is traced, and after restoring any
        checkpoint (or call `sync_guarded_state`). `tfmp.callbacks.LossScaleMonitor`
        does it for `fit`. Works with `apply`/`apply_gradients` on every backend.
        JAX's `fit` is stateless: the model's non-trainable state comes back from
        the forward pass outside the optimizer, so for a model on JAX its
        `train_step` is also wrapped to keep the state from before a skipped step
        (`tfmp.guarded_state.guard_jax_train_step`). A JAX loop of your own that
        calls `stateless_apply` keeps it the same way (`where(skipped, old, new)`).

        Args:
            variables: A model or layer (its `non_trainable_variables`, also those
                it creates later) or a list of variables.

        Returns:
            Whether anything new is guarded (a traced train step must be traced again).

        Example:

            opt.guard_state(model)
        """
        new = self._guarded.guard(variables)
        if keras.backend.backend() == "jax" and isinstance(variables, keras.Model):
            new = guard_jax_train_step(variables) or new
        return new

    @property
    def guarded_variables(self) -> list:
        """The variables `guard_state` restores on a skipped step."""
        return self._guarded.variables

    def sync_guarded_state(self) -> None:
        """Copies the guarded variables' current values into their shadows."""
        self._guarded.sync()

    # ------------------------------------------------------- loss and grads
    def scale_loss(self, loss):
        """Returns `loss * loss_scale` (float32), or `loss` when disabled.

        Also starts a step: it notes whether the loss is finite, so a skipped
        step can be told apart from a loss-scale overflow
        (`nonfinite_loss_steps`), and forgets gradients unscaled by
        `get_unscaled_gradients` in an earlier step that were never applied.
        """
        if _can_assign(loss):
            self._loss_nonfinite.assign(
                ops.cast(ops.logical_not(ops.all(ops.isfinite(loss))), "int32"))
            self._unscaled_this_step.assign(ops.zeros((), "int32"))
        if not self.enabled:
            return loss
        return ops.multiply(ops.cast(loss, "float32"), self.loss_scale)

    def get_scaled_loss(self, loss):
        """tf-keras name for `scale_loss`."""
        return self.scale_loss(loss)

    def get_unscaled_gradients(self, grads):
        """Divides gradients of a scaled loss by the scale (tf-keras API).

        The next `apply`/`apply_gradients` of the same step then takes its
        gradients as already unscaled and does not divide them again (also when
        this runs in one `tf.function` and the apply in another); clip or sum
        them first if you like. A step starts at `scale_loss`/`get_scaled_loss`:
        gradients unscaled in a step that was never applied do not make the
        next step's apply skip its unscaling.

        Args:
            grads: A list of gradients (`None` entries are kept).

        Returns:
            The list of unscaled gradients.
        """
        grads = list(grads)
        if not self.enabled:
            return grads
        out = [None if g is None else _numerics.divide_in_float32(g, self.dynamic_scale.value)
               for g in grads]
        self._unscaled_this_step.assign(ops.ones((), "int32"))
        return out

    # ----------------------------------------------------------------- apply
    def _prepare(self, grads, trainable_variables, scale, unscaled_flag=None):
        """Unscales `grads` unless `get_unscaled_gradients` did in this step.

        `unscaled_flag` is that step's flag (None on the stateless path, which
        has none). Gradients of `overwrite_with_gradient` variables are never
        unscaled (and are scaled back if `get_unscaled_gradients` divided them).
        Returns the gradients and the variables.
        """
        tvs = list(self._trainable_variables if trainable_variables is None
                   else trainable_variables)
        if len(grads) != len(tvs):
            raise ValueError(
                f"`grads` and `trainable_variables` must have the same length. Received: "
                f"{len(grads)} gradients for {len(tvs)} variables.")
        if not self.enabled:
            return list(grads), tvs
        divisor, restore = scale, None
        if unscaled_flag is not None:
            unscaled = ops.greater(unscaled_flag, 0)
            divisor = ops.where(unscaled, ops.ones_like(scale), scale)
            restore = ops.where(unscaled, 1.0 / scale, ops.ones_like(scale))
        out = []
        for g, v in zip(grads, tvs, strict=True):
            if g is not None and not self._overwrite_variable_with_gradient(v):
                g = _numerics.divide_in_float32(g, divisor)
            elif g is not None and restore is not None:
                g = _numerics.divide_in_float32(g, restore)
            out.append(g)
        return out, tvs

    def _prepare_stateful(self, grads, trainable_variables):
        grads, tvs = self._prepare(
            grads, trainable_variables, self.dynamic_scale.value,
            self._unscaled_this_step.value)
        self._unscaled_this_step.assign(ops.zeros((), "int32"))  # the step is done
        return grads, tvs

    def _finite_mask(self, grads, trainable_variables):
        """Per-variable check, ordered as the variables the optimizer was built on.

        Returns `(mask, finite)`: `mask[i]` is whether variable i's squared
        gradient norm is finite; `finite` whether the squared global norm is
        (false as soon as any element, square or the sum overflows).
        """
        norms = [None] * len(self._trainable_variables)
        float16_norms = []
        for g, v in zip(grads, trainable_variables, strict=True):
            if g is not None:
                norm = _numerics.squared_norm(g)
                norms[self._get_variable_index(v)] = norm
                if _numerics.dtype_of(g) == "float16":
                    float16_norms.append(norm)
        if not norms:
            return ops.ones((0,), "bool"), ops.convert_to_tensor(True)
        zero = ops.zeros((), "float32")
        norms = ops.stack([zero if n is None else n for n in norms])
        finite = ops.isfinite(ops.sum(norms))
        if float16_norms:  # `global_clipnorm` adds the float16 sums up in float16
            finite = ops.logical_and(finite, ops.less_equal(
                ops.sum(ops.stack(float16_norms)), _numerics.FLOAT16_MAX))
        if not self.skip_nonfinite:
            finite = ops.convert_to_tensor(True)
        return ops.isfinite(norms), finite

    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
            if not grads and not trainable_variables:
                return  # nothing to apply (as Keras' optimizers)
            if len(grads) != len(trainable_variables):  # before building on a wrong list
                raise ValueError(
                    f"`grads` and `trainable_variables` must have the same length. Received: "
                    f"{len(grads)} gradients for {len(trainable_variables)} variables.")
        if not self.built:
            if trainable_variables is None:
                raise ValueError(
                    "When passing `grads` without `trainable_variables`, the optimizer must "
                    "already be built: call `optimizer.build(trainable_variables)` first.")
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        elif trainable_variables is not None:
            self._check_variables_are_known(trainable_variables)
        if keras.backend.backend() == "tensorflow":
            self._tf_apply(grads, trainable_variables)
            return
        grads, tvs = self._prepare_stateful(grads, trainable_variables)
        if not (self.enabled or self.skip_nonfinite):
            self.inner_optimizer.apply(grads, trainable_variables)
            return
        self._common_apply(grads, tvs, trainable_variables, self._take_loss_flag())

    def _take_loss_flag(self):
        """Reads (and clears) this replica's non-finite-loss flag, as float32."""
        flag = ops.cast(self._loss_nonfinite.value, "float32")
        self._loss_nonfinite.assign(ops.zeros((), "int32"))
        return flag

    def _common_apply(self, grads, tvs, trainable_variables, loss_flag):
        """Checks, applies or skips, and updates the state (replica or local context)."""
        mask, finite = self._finite_mask(grads, tvs)
        if keras.backend.backend() == "tensorflow":
            ops.cond(finite, lambda: self.inner_optimizer.apply(grads, trainable_variables),
                     lambda: None)
        elif bool(ops.convert_to_numpy(finite)):
            # Stateful apply on JAX/PyTorch runs eagerly: a traced `cond` would
            # leave tracers in the variables.
            self.inner_optimizer.apply(grads, trainable_variables)
        self._guarded.restore(finite)
        self._assign_state(finite, mask, loss_flag)

    def _assign_state(self, finite, mask, loss_flag):
        new_state = self._next_state(finite, [v.value for v in self._state_vars])
        for var, value in zip(self._state_vars, new_state, strict=True):
            var.assign(value)
        self.nonfinite_mask.assign(ops.cast(ops.logical_not(mask), "int32"))
        skipped_on_loss = ops.logical_and(ops.logical_not(finite), ops.greater(loss_flag, 0))
        self._nonfinite_loss_steps.assign(
            self._nonfinite_loss_steps.value + ops.cast(skipped_on_loss, "int32"))

    def _tf_apply(self, grads, trainable_variables=None):
        """TensorFlow only: `tf.distribute`-aware apply.

        Gradients are all-reduced *before* the check, so a non-finite gradient on
        any replica makes every replica skip the same step, and the inner
        optimizer's clipping sees the global gradient.
        """
        import tensorflow as tf

        if tf.distribute.in_cross_replica_context():
            raise ValueError("apply() must be called in a replica context.")
        grads, tvs = self._prepare_stateful(grads, trainable_variables)
        loss_flag = self._take_loss_flag()
        ctx = tf.distribute.get_replica_context()
        if tf.distribute.has_strategy() and ctx.num_replicas_in_sync > 1:
            # The inner optimizer's own all-reduce is switched off (see __init__).
            # The loss flags travel in the same all-reduce (no extra collective).
            present = [i for i, g in enumerate(grads) if g is not None]
            reduced = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                                     [grads[i] for i in present] + [loss_flag])
            for i, g in zip(present, reduced[:-1], strict=True):
                grads[i] = g
            loss_flag = reduced[-1]
        if not (self.enabled or self.skip_nonfinite):
            return self.inner_optimizer.apply(grads, trainable_variables)
        if not tf.distribute.has_strategy():
            return self._common_apply(grads, tvs, trainable_variables, loss_flag)
        # Also where the strategy needs no merge call (several GPUs with XLA): the
        # inner apply assigns `only_first_replica` variables (its `iterations`),
        # which broadcast through a merge call, and a merge call inside a `cond`
        # branch built in replica context fails (keras-team/keras#21366). The cond
        # is therefore built in cross-replica context on every strategy.
        # The gradients were all-reduced, so every replica holds the same mask.
        mask_per_replica, finite_per_replica = self._finite_mask(grads, tvs)
        self._guarded.restore(finite_per_replica)  # replica-local state, in replica context

        def cross_replica(distribution, grads, mask_per_replica, loss_flag):
            mask = distribution.experimental_local_results(mask_per_replica)[0]
            finite = distribution.experimental_local_results(finite_per_replica)[0]

            def apply_fn():
                distribution.extended.call_for_each_replica(
                    self.inner_optimizer.apply, args=(grads, trainable_variables)
                )

            # The cond must be built in cross-replica context: the inner
            # optimizer's apply calls merge_call.
            ops.cond(finite, apply_fn, lambda: None)
            self._assign_state(finite, mask,
                               distribution.experimental_local_results(loss_flag)[0])

        ctx.merge_call(cross_replica, args=(grads, mask_per_replica, loss_flag))

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        """Stateless apply (JAX); same algorithm as `apply` (without `guard_state`)."""
        if not self.built:
            raise ValueError(
                f"To call `stateless_apply`, {self.__class__.__name__} must be built "
                "(call `optimizer.build(trainable_variables)`)."
            )
        n_own = len(self._variables)
        own, inner = list(optimizer_variables[:n_own]), list(optimizer_variables[n_own:])
        index = {id(v): i for i, v in enumerate(self._variables)}
        state_idx = [index[id(v)] for v in self._state_vars]
        scale = own[index[id(self.dynamic_scale)]]
        grads, tvs = self._prepare(list(grads), None, scale)
        if not (self.enabled or self.skip_nonfinite):
            new_tvs, new_inner = self.inner_optimizer.stateless_apply(
                inner, grads, trainable_variables)
            return new_tvs, own + list(new_inner)
        mask, finite = self._finite_mask(grads, tvs)
        new_state = self._next_state(finite, [own[i] for i in state_idx])
        for i, value in zip(state_idx, new_state, strict=True):
            own[i] = value
        own[index[id(self.nonfinite_mask)]] = ops.cast(ops.logical_not(mask), "int32")

        def apply_fn():
            new_tvs, new_inner = self.inner_optimizer.stateless_apply(
                inner, grads, trainable_variables)
            return list(new_tvs), list(new_inner)

        new_tvs, new_inner = ops.cond(
            finite, apply_fn, lambda: (list(trainable_variables), inner))
        return new_tvs, own + list(new_inner)

    # ---------------------------------------------------------------- config
    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if config.get("dynamic") is False:  # files of tfmp 0.1 stored the unused count
            config["dynamic_growth_steps"] = None
        return super().from_config(config, custom_objects=custom_objects)

    def get_config(self):
        config = super().get_config()
        config.update(
            dynamic=self.dynamic,
            growth_factor=self.growth_factor,
            backoff_factor=self.backoff_factor,
            min_scale=self.min_scale,
            max_scale=self.max_scale,
            hysteresis=self.hysteresis,
            enabled=self.enabled,
            skip_nonfinite=self.skip_nonfinite,
        )
        return config
