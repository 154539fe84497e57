"""`LossScaleOptimizer`: Keras' loss scaling, bounded, and safe for the weights.

The core update is written with `keras.ops` and works on every Keras backend;
the `tf.distribute` path is in `_tf_apply` and says so.
"""

from __future__ import annotations

import keras
from keras import ops

# State kept by the optimizer, in the order of its variables (after Keras'
# own `iteration` and `learning_rate`). Each field:
#   step_counter          finite steps since the scale last changed upwards or
#                         since the last non-finite step; the scale grows when
#                         it reaches `dynamic_growth_steps`.
#   dynamic_scale         the current loss scale, always in [min_scale, max_scale].
#   hysteresis_left       non-finite steps still tolerated before the scale is
#                         lowered; reset to `hysteresis` on every growth.
#   skipped_steps         total steps skipped for non-finite gradients.
#   consecutive_skipped   steps skipped in a row (0 after any applied step).
_STATE = (
    ("step_counter", "int"),
    ("dynamic_scale", "float32"),
    ("hysteresis_left", "int"),
    ("skipped_steps", "int"),
    ("consecutive_skipped", "int"),
)


_FLOAT32_TINY = 2.0**-126  # smallest normal float32
_FLOAT32_MAX = 3.4028234663852886e38


def _check(condition: bool, argument: str, value, allowed: str) -> None:
    if not condition:
        raise ValueError(f"`{argument}` must be {allowed}. Received: {argument}={value!r}")


@keras.saving.register_keras_serializable(package="tfmp")
class LossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Dynamic (or fixed) loss scaling that never writes a non-finite value into a weight.

    A drop-in subclass of `keras.optimizers.LossScaleOptimizer`. Over Keras' class it
    bounds the scale to `[min_scale, max_scale]` (Keras' doubles to `inf` and halves
    to 0), decides skip-or-apply from the gradients of *all* replicas under
    `tf.distribute` (Keras' checks replica 0 only), supports a fixed scale
    (`dynamic=False`), DeepSpeed-style hysteresis, the tf-keras custom-loop API
    (`get_scaled_loss`, `get_unscaled_gradients`), and exposes counters.

    The algorithm, for each call of `apply(grads)`:

        g = grads / scale                     # unless already unscaled by the user
        if tf.distribute: g = all_reduce_sum(g)   # before the check and the clipping
        finite = all(isfinite(sum(g_i)) for each variable i)   # one reduction each
        if finite:
            inner_optimizer.apply(g)          # clipping, weight decay, EMA, accumulation
            consecutive_skipped = 0
            step_counter += 1
            if dynamic and step_counter == dynamic_growth_steps:
                scale = min(scale * growth_factor, max_scale)
                step_counter = 0
                hysteresis_left = hysteresis
        else:                                 # weights and inner state untouched
            skipped_steps += 1; consecutive_skipped += 1
            step_counter = 0
            if dynamic:
                if hysteresis_left <= 1:
                    scale = max(scale * backoff_factor, min_scale)
                else:
                    hysteresis_left -= 1

    `iterations` counts applied steps only, so learning-rate schedules do not
    advance on skipped steps. With `enabled=False` gradients go straight to the
    inner optimizer and the loss is not scaled, so one script serves every policy.

    Args:
        inner_optimizer: The `keras.optimizers.Optimizer` to wrap (not itself a
            `LossScaleOptimizer`). Under `tf.distribute` the wrapper all-reduces
            the gradients, so the inner optimizer must only be used through it.
        initial_scale: The starting loss scale, in `[min_scale, max_scale]`.
        dynamic_growth_steps: Finite steps in a row after which the scale grows.
        dynamic: If False, the scale stays at `initial_scale` for good;
            non-finite steps are still skipped.
        growth_factor: Factor (> 1) applied on growth.
        backoff_factor: Factor in (0, 1) applied when the scale is lowered.
        min_scale: Smallest scale (> 0).
        max_scale: Largest scale (finite, >= min_scale).
        hysteresis: Non-finite steps (>= 1) since the last growth before the
            scale is lowered; each is still skipped.
        enabled: If False, no scaling and no skipping.
        name: Optional name.

    Example:

        opt = tfmp.LossScaleOptimizer(keras.optimizers.Adam(1e-3))
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y)
        print(float(opt.loss_scale), int(opt.skipped_steps))

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
        dynamic_growth_steps: int = 2000,
        *,
        dynamic: bool = True,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        min_scale: float = 1.0,
        max_scale: float = 2.0**24,
        hysteresis: int = 1,
        enabled: bool = True,
        name: str | None = None,
        **kwargs,
    ):
        if isinstance(inner_optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError(
                "`inner_optimizer` is already a LossScaleOptimizer and cannot be wrapped "
                f"again. Received: inner_optimizer={inner_optimizer!r}; pass the optimizer "
                "it wraps instead."
            )
        _check(
            isinstance(inner_optimizer, keras.optimizers.Optimizer),
            "inner_optimizer", inner_optimizer, "a `keras.optimizers.Optimizer` instance",
        )
        for argument, value in (("initial_scale", initial_scale), ("growth_factor", growth_factor),
                                 ("backoff_factor", backoff_factor), ("min_scale", min_scale),
                                 ("max_scale", max_scale)):
            _check(isinstance(value, (int, float)) and not isinstance(value, bool), argument,
                   value, "a number")
        for argument, value in (("initial_scale", initial_scale), ("min_scale", min_scale),
                                ("max_scale", max_scale)):
            # The scale lives in a float32 variable: 1e-46 would be stored as 0.
            _check(_FLOAT32_TINY <= value <= _FLOAT32_MAX, argument, value,
                   f"in float32's normal range [{_FLOAT32_TINY:.4g}, {_FLOAT32_MAX:.4g}]")
        _check(growth_factor > 1, "growth_factor", growth_factor, "> 1")
        _check(0 < backoff_factor < 1, "backoff_factor", backoff_factor, "in (0, 1)")
        _check(min_scale <= max_scale, "min_scale", min_scale, f"<= max_scale ({max_scale})")
        _check(
            min_scale <= initial_scale <= max_scale, "initial_scale", initial_scale,
            f"in [min_scale, max_scale] = [{min_scale}, {max_scale}]",
        )
        _check(
            isinstance(dynamic_growth_steps, int) and dynamic_growth_steps >= 1,
            "dynamic_growth_steps", dynamic_growth_steps, "an integer >= 1",
        )
        _check(
            isinstance(hysteresis, int) and hysteresis >= 1,
            "hysteresis", hysteresis, "an integer >= 1",
        )
        super().__init__(
            inner_optimizer, initial_scale, dynamic_growth_steps, name=name, **kwargs
        )
        self.dynamic = bool(dynamic)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.hysteresis = int(hysteresis)
        self.enabled = bool(enabled)
        # 1 after `get_unscaled_gradients`: the next apply does not divide again.
        # Made here, not in build(), so that a tf-keras loop's first call (before
        # the first apply builds the optimizer) already sets it at run time.
        with keras.name_scope(self.name, caller=self):
            self.grads_unscaled = keras.Variable(  # an initializer: a buffer of its own
                keras.initializers.Zeros(), shape=(), name="grads_unscaled", dtype="int32",
                trainable=False, aggregation="only_first_replica")  # tracked on assignment
        if keras.backend.backend() == "tensorflow":
            # The wrapper all-reduces before checking and unscaling, so the inner
            # optimizer must not sum the (already summed) gradients again.
            inner_optimizer._all_reduce_sum_gradients = list

    # ----------------------------------------------------------------- state
    @keras.src.utils.tracking.no_automatic_dependency_tracking
    def build(self, var_list):
        initial = {
            "dynamic_scale": self.initial_scale,
            "hysteresis_left": self.hysteresis,
        }
        self._state_vars = [
            self.add_variable(
                shape=(), dtype=dtype, name=name,
                initializer=keras.initializers.Constant(initial.get(name, 0)),
                aggregation="only_first_replica",
            )
            for name, dtype in _STATE
        ]
        # Keras' class names these two; they stay readable under the same names.
        self.step_counter, self.dynamic_scale = self._state_vars[:2]
        # 1 where the variable's gradient was non-finite on the last step.
        self.nonfinite_mask = self.add_variable(
            shape=(len(var_list),), dtype="int32", name="nonfinite_mask",
            initializer="zeros", aggregation="only_first_replica",
        )
        self.inner_optimizer.build(var_list)
        keras.optimizers.Optimizer.build(self, var_list)

    @property
    def loss_scale(self):
        """The current loss scale (a scalar variable once built)."""
        if not self.enabled:
            return 1.0
        return self.dynamic_scale if self.built else self.initial_scale

    @property
    def skipped_steps(self):
        """Total number of steps skipped for non-finite gradients."""
        return self._state_vars[3] if self.built else 0

    @property
    def consecutive_skipped_steps(self):
        """Steps skipped in a row up to now (0 after an applied step)."""
        return self._state_vars[4] if self.built else 0

    @property
    def last_step_skipped(self):
        """Whether the last step was skipped (a boolean tensor once built)."""
        return ops.greater(self._state_vars[4], 0) if self.built else False

    def nonfinite_variables(self) -> list[str]:
        """Paths of the variables whose gradients were non-finite on the last step."""
        if not self.built:
            return []
        mask = ops.convert_to_numpy(self.nonfinite_mask)
        return [v.path for v, bad in zip(self._trainable_variables, mask, strict=True) if bad]

    def _next_state(self, finite, state):
        """Pure state transition for one step; `state` follows `_STATE`."""
        counter, scale, hyst_left, skipped, consecutive = state
        not_finite = ops.logical_not(finite)
        one = ops.ones_like(counter)
        skipped = ops.where(finite, skipped, skipped + one)
        consecutive = ops.where(finite, ops.zeros_like(consecutive), consecutive + one)
        if not self.dynamic:
            return [ops.zeros_like(counter), scale, hyst_left, skipped, consecutive]
        grow = ops.logical_and(finite, ops.greater_equal(counter + one, self.dynamic_growth_steps))
        lower = ops.logical_and(not_finite, ops.less_equal(hyst_left, 1))
        new_scale = ops.where(
            grow,
            ops.minimum(scale * self.growth_factor, self.max_scale),
            ops.where(lower, ops.maximum(scale * self.backoff_factor, self.min_scale), scale),
        )
        reset = ops.logical_or(grow, not_finite)
        counter = ops.where(reset, ops.zeros_like(counter), counter + one)
        hyst_left = ops.where(
            grow,
            ops.full_like(hyst_left, self.hysteresis),
            ops.where(ops.logical_and(not_finite, ops.greater(hyst_left, 1)), hyst_left - one,
                      hyst_left),
        )
        return [counter, ops.cast(new_scale, "float32"), hyst_left, skipped, consecutive]

    # ------------------------------------------------------- loss and grads
    def scale_loss(self, loss):
        """Returns `loss * loss_scale` (float32), or `loss` when disabled."""
        if not self.enabled:
            return loss
        return ops.multiply(ops.cast(loss, "float32"), self.loss_scale)

    def get_scaled_loss(self, loss):
        """tf-keras name for `scale_loss`."""
        return self.scale_loss(loss)

    def get_unscaled_gradients(self, grads):
        """Divides gradients of a scaled loss by the scale (tf-keras API).

        The next `apply`/`apply_gradients` then takes its gradients as already
        unscaled and does not divide them again (also when this runs in one
        `tf.function` and the apply in another): call it only on gradients you
        are about to apply.

        Args:
            grads: A list of gradients (`None` entries are kept).

        Returns:
            The list of unscaled gradients.
        """
        if not self.enabled:
            return list(grads)
        self.grads_unscaled.assign(1)
        return self._divide(grads, [False] * len(grads), self.loss_scale)

    @staticmethod
    def _divide(grads, keep, scale):
        """`g / scale` for each gradient not `None` nor kept; the scale is read once."""
        scale = ops.convert_to_tensor(scale)
        casts = {}
        out = []
        for g, k in zip(grads, keep, strict=True):
            if g is None or k:
                out.append(g)
                continue
            dtype = keras.backend.standardize_dtype(g.dtype)
            if dtype not in casts:
                casts[dtype] = scale if dtype == "float32" else ops.cast(scale, dtype)
            out.append(ops.divide(g, casts[dtype]))
        return out

    def _unscale(self, grads, trainable_variables, scale):
        keep = [self._overwrite_variable_with_gradient(v) for v in trainable_variables]
        return self._divide(grads, keep, scale)

    def _finite_mask(self, grads, trainable_variables):
        """Per-variable finiteness, ordered as the variables the optimizer was built on.

        One reduction a gradient: `sum(g)` is inf or NaN as soon as one element
        is, so `isfinite(sum(g))` finds every non-finite gradient with one kernel
        (`all(isfinite(g))` takes two). Sums are taken in float32 (16-bit
        gradients are cast first). A gradient whose finite elements sum past
        float32's range (3.4e38) also counts as non-finite: such a step is skipped.
        """
        sums = [None] * len(self._trainable_variables)
        for g, v in zip(grads, trainable_variables, strict=True):
            if g is not None:
                if keras.backend.standardize_dtype(g.dtype) != "float32":
                    g = ops.cast(g, "float32")
                sums[self._get_variable_index(v)] = ops.sum(g)
        if any(s is None for s in sums):  # variables without a gradient count as finite
            zero = ops.zeros((), "float32")
            sums = [zero if s is None else s for s in sums]
        mask = ops.isfinite(ops.stack(sums)) if sums else ops.ones((0,), "bool")
        return mask, ops.all(mask)

    # ----------------------------------------------------------------- apply
    def _prepare(self, grads, trainable_variables, scale, unscaled_flag):
        """Unscales `grads` unless `get_unscaled_gradients` already did.

        Returns the gradients, the variables and the new value of the flag (0).
        """
        tvs = list(trainable_variables or self._trainable_variables)
        if len(grads) != len(tvs):
            raise ValueError(
                f"`grads` and `trainable_variables` must have the same length. Received: "
                f"{len(grads)} gradients for {len(tvs)} variables.")
        divisor = ops.where(ops.greater(unscaled_flag, 0), ops.ones_like(scale), scale)
        return self._unscale(grads, tvs, divisor), tvs, ops.zeros_like(unscaled_flag)

    def _prepare_stateful(self, grads, trainable_variables):
        grads, tvs, flag = self._prepare(
            grads, trainable_variables, self.dynamic_scale.value, self.grads_unscaled.value)
        self.grads_unscaled.assign(flag)
        return grads, tvs

    def apply(self, grads, trainable_variables=None):
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
        elif not self.enabled:
            self.inner_optimizer.apply(grads, trainable_variables)
        else:
            grads, tvs = self._prepare_stateful(grads, trainable_variables)
            self._common_apply(grads, tvs, trainable_variables)

    def _common_apply(self, grads, tvs, trainable_variables):
        """Checks, applies or skips, and updates the state (replica or local context)."""
        mask, finite = self._finite_mask(grads, tvs)
        ops.cond(
            finite,
            lambda: self.inner_optimizer.apply(grads, trainable_variables),
            lambda: None,
        )
        self._assign_state(finite, mask)

    def _assign_state(self, finite, mask):
        new_state = self._next_state(finite, [v.value for v in self._state_vars])
        for var, value in zip(self._state_vars, new_state, strict=True):
            var.assign(value)
        self.nonfinite_mask.assign(ops.cast(ops.logical_not(mask), "int32"))

    def _tf_apply(self, grads, trainable_variables=None):
        """TensorFlow only: `tf.distribute`-aware apply.

        Gradients are all-reduced *before* the finiteness check, so a non-finite
        gradient on any replica makes every replica skip the same step, and the
        inner optimizer's clipping sees the global gradient.
        """
        import tensorflow as tf

        if tf.distribute.in_cross_replica_context():
            raise ValueError("apply() must be called in a replica context.")
        if self.enabled:
            grads, tvs = self._prepare_stateful(grads, trainable_variables)
        else:
            grads, tvs = list(grads), list(trainable_variables or self._trainable_variables)
        ctx = tf.distribute.get_replica_context()
        if tf.distribute.has_strategy() and ctx.num_replicas_in_sync > 1:
            # The inner optimizer's own all-reduce is switched off (see __init__).
            present = [i for i, g in enumerate(grads) if g is not None]
            reduced = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [grads[i] for i in present])
            for i, g in zip(present, reduced, strict=True):
                grads[i] = g
        if not self.enabled:
            return self.inner_optimizer.apply(grads, trainable_variables)
        if not tf.distribute.has_strategy():
            return self._common_apply(grads, tvs, trainable_variables)
        if tf.__internal__.distribute.strategy_supports_no_merge_call():
            return self._common_apply(grads, tvs, trainable_variables)

        mask_per_replica = self._finite_mask(grads, tvs)[0]

        def cross_replica(distribution, grads, mask_per_replica):
            # The gradients were all-reduced, so every replica holds the same mask.
            mask = distribution.experimental_local_results(mask_per_replica)[0]
            finite = ops.all(mask)

            def apply_fn():
                distribution.extended.call_for_each_replica(
                    self.inner_optimizer.apply, args=(grads, trainable_variables)
                )

            # The cond must be built in cross-replica context: the inner
            # optimizer's apply calls merge_call.
            ops.cond(finite, apply_fn, lambda: None)
            self._assign_state(finite, mask)

        ctx.merge_call(cross_replica, args=(grads, mask_per_replica))

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        """Stateless apply (JAX); same algorithm as `apply`."""
        if not self.built:
            raise ValueError(
                f"To call `stateless_apply`, {self.__class__.__name__} must be built "
                "(call `optimizer.build(trainable_variables)`)."
            )
        n_own = len(self._variables)
        own, inner = list(optimizer_variables[:n_own]), list(optimizer_variables[n_own:])
        if not self.enabled:
            new_tvs, new_inner = self.inner_optimizer.stateless_apply(
                inner, grads, trainable_variables)
            return new_tvs, own + list(new_inner)
        index = {id(v): i for i, v in enumerate(self._variables)}
        state_idx = [index[id(v)] for v in self._state_vars]
        scale = own[index[id(self.dynamic_scale)]]
        flag_idx = index[id(self.grads_unscaled)]
        grads, tvs, own[flag_idx] = self._prepare(grads, None, scale, own[flag_idx])
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
        return super().from_config(dict(config), custom_objects=custom_objects)

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
        )
        return config
