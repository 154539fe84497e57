"""Tests for tfmp.LossScaleOptimizer.

Each `_check_*` helper states one behaviour; the tfmp test runs it on tfmp's
class, and where Keras' own class gets it wrong a `test_stock_*` case shows that
the same check fails on `keras.optimizers.LossScaleOptimizer`.
"""

import gc
import os
import unittest

import keras
import numpy as np
from absl.testing import parameterized
from keras import ops

import tfmp
from tests.base import BACKEND, TestCase, apply_step, requires_tensorflow, tf, two_replica_strategy

STOCK = keras.optimizers.LossScaleOptimizer


def _scale(opt):
    return float(ops.convert_to_numpy(opt.scale_loss(1.0)))


def _int(x):
    return int(np.asarray(ops.convert_to_numpy(x)))


def _var(values=(1.0, 2.0)):
    return keras.Variable(np.array(values, "float32"))


def _grad(values):
    return ops.convert_to_tensor(np.array(values, "float32"))


class BoundsTest(TestCase):
    """Stock failures 1 and 2: the scale climbs to inf or falls to 0."""

    def _grow_for_120_steps(self, cls):
        """Gradients that never overflow: the scale grows every step.

        Returns the scale, and whether the next clean step moved the weights.
        """
        opt = cls(keras.optimizers.SGD(0.01), initial_scale=2.0**15, dynamic_growth_steps=1)
        v = _var()
        for _ in range(120):  # 2**15 * 2**120 is past float32's range
            apply_step(opt, [_grad([1.0, 1.0]) * opt.scale_loss(1.0)], [v])
        before = v.numpy().copy()
        apply_step(opt, [_grad([1.0, 1.0]) * opt.scale_loss(1.0)], [v])
        return _scale(opt), not np.array_equal(before, v.numpy())

    def _halve_for_200_steps(self, cls):
        """200 NaN steps, then a clean one. Returns the scale and the weights."""
        opt = cls(keras.optimizers.SGD(0.01))
        v = _var()
        for _ in range(200):  # 2**15 * 2**-200 is 0 in float32
            apply_step(opt, [_grad([np.nan, 1.0])], [v])
        scale = _scale(opt)
        apply_step(opt, [_grad([1.0, 1.0]) * opt.scale_loss(1.0)], [v])  # clean data again
        return scale, v.numpy()

    def test_scale_has_ceiling(self):
        scale, moved = self._grow_for_120_steps(tfmp.LossScaleOptimizer)
        self.assertEqual(scale, 2.0**24)
        self.assertTrue(moved, "a clean step was not applied")

    def test_scale_stops_at_max_scale(self):
        opt = tfmp.LossScaleOptimizer(
            keras.optimizers.SGD(0.01), initial_scale=4.0, dynamic_growth_steps=1, max_scale=64.0)
        v = _var()
        for _ in range(10):
            opt.apply([_grad([1.0, 1.0])], [v])
        self.assertEqual(_scale(opt), 64.0)

    def test_stock_scale_reaches_inf(self):
        scale, moved = self._grow_for_120_steps(STOCK)
        self.assertEqual(scale, np.inf)
        self.assertFalse(moved, "stock applied a step at an infinite scale")

    def test_scale_has_floor(self):
        scale, weights = self._halve_for_200_steps(tfmp.LossScaleOptimizer)
        self.assertEqual(scale, 1.0)
        self.assertAllClose(weights, [0.99, 1.99], rtol=1e-5)
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.01), min_scale=2.0)
        v = _var()
        for _ in range(30):
            opt.apply([_grad([np.inf, 1.0])], [v])
        self.assertEqual(_scale(opt), 2.0)
        self.assertAllClose(v, [1.0, 2.0])

    def test_stock_scale_reaches_zero_and_poisons_weights(self):
        scale, weights = self._halve_for_200_steps(STOCK)
        self.assertEqual(scale, 0.0)
        self.assertTrue(np.isnan(weights).all(), weights)

    @unittest.skipUnless(BACKEND == "jax", "JAX only")
    def test_stock_eager_apply_fails_on_jax(self):
        # A custom loop calling Keras' class eagerly on JAX: its cond leaks a
        # tracer into the weights, which fail the next time they are read.
        import jax

        v = _var()
        with self.assertRaises(jax.errors.UnexpectedTracerError):
            STOCK(keras.optimizers.SGD(0.01)).apply([_grad([1.0, 1.0])], [v])
            ops.convert_to_numpy(v + 0.0)
        v = _var()
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.5), initial_scale=1.0)
        opt.apply([_grad([1.0, 1.0])], [v])
        opt.apply([_grad([np.nan, 1.0])], [v])
        self.assertAllClose(v, [0.5, 1.5])
        self.assertEqual(opt.stats()["skipped_steps"], 1)


class DynamicsTest(TestCase):
    def test_skip_leaves_weights_and_inner_state_untouched(self):
        opt = tfmp.LossScaleOptimizer(keras.optimizers.Adam(0.1), initial_scale=8.0)
        v = _var()
        opt.apply([_grad([8.0, 8.0])], [v])
        weights = v.numpy().copy()
        inner = [x.numpy().copy() for x in opt.inner_optimizer.variables]
        opt.apply([_grad([np.nan, 8.0])], [v])
        self.assertAllClose(v, weights, rtol=0, atol=0)
        for before, after in zip(inner, opt.inner_optimizer.variables, strict=True):
            np.testing.assert_array_equal(before, after.numpy())
        self.assertEqual(_scale(opt), 4.0)

    def test_counters_and_iterations(self):
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [1.0, 0.0])
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(schedule), initial_scale=1.0)
        v = _var()
        self.assertEqual(_int(opt.skipped_steps), 0)
        bad, good = [_grad([np.nan, 1.0])], [_grad([1.0, 1.0])]
        for grads in (good, bad, bad, bad, good):
            opt.apply(grads, [v])
        self.assertEqual(_int(opt.skipped_steps), 3)
        self.assertEqual(_int(opt.consecutive_skipped_steps), 0)
        self.assertFalse(bool(opt.last_step_skipped))
        # Two applied steps: the schedule (lr 1.0 for steps 0-2) did not
        # advance on the three skipped ones, so both steps used lr=1.0.
        self.assertEqual(_int(opt.iterations), 2)
        self.assertAllClose(v, [-1.0, 0.0])
        opt.apply(bad, [v])
        self.assertEqual(_int(opt.consecutive_skipped_steps), 1)
        self.assertTrue(bool(opt.last_step_skipped))
        self.assertEqual(opt.nonfinite_variables(), [v.path])

    def test_nonfinite_variables_names_only_the_bad_ones(self):
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.1))
        a, b, c = _var(), _var(), _var()
        opt.apply([_grad([1.0, 1.0]), _grad([np.inf, 1.0]), None], [a, b, c])
        self.assertEqual(opt.nonfinite_variables(), [b.path])

    @parameterized.named_parameters(
        ("inf_and_minus_inf", [np.inf, -np.inf], "float32", True),
        ("nan_among_large", [np.nan, 1e30], "float32", True),
        ("squares_overflow", [1e20, 1e20], "float32", True),
        ("squares_sum_overflows", [1.5e19, 1.5e19], "float32", True),
        ("squares_finite", [1e19, 1e19], "float32", False),
        ("tiny", [1e-30, -1e-30], "float32", False),
        ("float16_square_past_65504", [300.0, 1.0], "float16", True),
        ("float16_squares_sum_past_65504", [255.0, -255.0], "float16", True),
        ("float16_squares_finite", [180.0, -180.0], "float16", False),
        ("float16_inf", [np.inf, 1.0], "float16", True),
        ("bfloat16_large", [1e18, 1e18], "bfloat16", False),
    )
    def test_finiteness_check(self, values, dtype, skipped):
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(1e-3), initial_scale=1.0)
        v = keras.Variable(np.zeros(2, "float32"), dtype=dtype)
        grad = ops.convert_to_tensor(np.array(values, "float32"), dtype)
        opt.apply([grad], [v])
        self.assertEqual(bool(opt.last_step_skipped), skipped)
        self.assertAllFinite(v)
        expected = 0.0 if skipped else -1e-3 * np.asarray(ops.convert_to_numpy(
            ops.cast(grad, "float32")))
        self.assertAllClose(ops.cast(v, "float32"), expected * np.ones(2), rtol=1e-2, atol=0)

    def test_growth_and_backoff_factors(self):
        opt = tfmp.LossScaleOptimizer(
            keras.optimizers.SGD(0.1), initial_scale=16.0, dynamic_growth_steps=2,
            growth_factor=4.0, backoff_factor=0.25)
        v = _var()
        good, bad = [_grad([1.0, 1.0])], [_grad([np.nan, 1.0])]
        opt.apply(good, [v])
        self.assertEqual(_scale(opt), 16.0)
        opt.apply(good, [v])
        self.assertEqual(_scale(opt), 64.0)
        opt.apply(good, [v])
        opt.apply(bad, [v])  # resets the growth counter, too
        self.assertEqual(_scale(opt), 16.0)
        opt.apply(good, [v])
        self.assertEqual(_scale(opt), 16.0)

    def test_hysteresis(self):
        opt = tfmp.LossScaleOptimizer(
            keras.optimizers.SGD(0.1), initial_scale=64.0, dynamic_growth_steps=2, hysteresis=3)
        v = _var()
        good, bad = [_grad([1.0, 1.0])], [_grad([np.nan, 1.0])]
        scales = []
        for grads in (bad, bad, bad, bad, good, good, bad, bad, bad):
            opt.apply(grads, [v])
            scales.append(_scale(opt))
        # Two overflows tolerated, the third lowers; after that every overflow
        # lowers until a growth restores the hysteresis.
        self.assertEqual(scales, [64, 64, 32, 16, 16, 32, 32, 32, 16])
        self.assertEqual(_int(opt.skipped_steps), 7)
        # The two applied steps both ran at scale 16: each moved lr * 1/16.
        self.assertAllClose(v, [1.0 - 2 * 0.1 / 16, 2.0 - 2 * 0.1 / 16])

    def test_fixed_scale(self):
        opt = tfmp.LossScaleOptimizer(
            keras.optimizers.SGD(0.5), initial_scale=128.0, dynamic=False)
        v = _var()
        for grads in ([_grad([128.0, 256.0])],) * 3 + ([_grad([np.nan, 1.0])],) * 3:
            opt.apply(grads, [v])
        self.assertEqual(_scale(opt), 128.0)
        self.assertEqual(_int(opt.skipped_steps), 3)
        self.assertAllClose(v, [1.0 - 1.5, 2.0 - 3.0])

    def test_stock_refuses_fixed_scale(self):
        with self.assertRaisesRegex(ValueError, "dynamic=False"):
            STOCK(keras.optimizers.SGD(0.5), dynamic=False)

    def test_disabled_passes_gradients_through(self):
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.5), enabled=False)
        v = _var()
        self.assertEqual(float(opt.scale_loss(3.0)), 3.0)
        opt.apply([_grad([2.0, 4.0])], [v])
        self.assertAllClose(v, [0.0, 0.0])
        self.assertEqual(_scale(opt), 1.0)

    @parameterized.named_parameters(
        ("global_clipnorm", dict(global_clipnorm=1.0)),
        ("clipvalue", dict(clipvalue=0.5)),
        ("weight_decay", dict(weight_decay=0.1)),
        ("accumulation", dict(gradient_accumulation_steps=2)),
        # The EMA is written into the weights every 2 steps: compared, not ignored.
        ("ema", dict(use_ema=True, ema_momentum=0.5, ema_overwrite_frequency=2)),
    )
    def test_inner_features_see_unscaled_gradients(self, kwargs):
        grads = [[3.0, 4.0], [-1.0, 0.5], [2.0, 2.0], [0.1, -0.3]]
        plain, scaled = _var(), _var()
        plain_opt = keras.optimizers.SGD(0.1, **kwargs)
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.1, **kwargs), initial_scale=2.0**10)
        for g in grads:
            plain_opt.apply([_grad(g)], [plain])
            opt.apply([_grad(g) * opt.scale_loss(1.0)], [scaled])
        self.assertAllClose(scaled, plain, rtol=1e-6)
        self.assertFalse(np.allclose(plain.numpy(), [1.0, 2.0]))


def _mlp(seed=1):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                             keras.layers.Dense(1)])


def _regression_data(n=32):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype("float32")
    return x, (x @ np.array([1.0, -2.0, 0.5, 3.0], "float32"))[:, None]


class CustomLoopTest(TestCase):
    """Stock gap 4: the tf-keras custom-loop API."""

    @parameterized.named_parameters(("tf_keras_style", True), ("keras3_style", False))
    @requires_tensorflow
    def test_gradient_tape_loop_matches_plain_optimizer(self, tf_keras_style):
        x, y = _regression_data()
        loss_fn = keras.losses.MeanSquaredError()
        plain_model, model = _mlp(), _mlp()
        plain_opt = keras.optimizers.SGD(0.05)
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.05), initial_scale=2.0**12)

        @tf.function
        def step(model, opt, scaled):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x))
                target = (opt.get_scaled_loss(loss) if tf_keras_style else opt.scale_loss(loss)
                          ) if scaled else loss
            grads = tape.gradient(target, model.trainable_variables)
            if scaled and tf_keras_style:
                grads = opt.get_unscaled_gradients(grads)
            opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return loss

        losses = [float(step(model, opt, True)) for _ in range(20)]
        for _ in range(20):
            step(plain_model, plain_opt, False)
        self.assertLess(losses[-1], 0.5 * losses[0])
        for a, b in zip(model.get_weights(), plain_model.get_weights(), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    @requires_tensorflow
    def test_function_traced_before_build_follows_the_scale(self):
        # A tf-keras loop: scaled loss and unscaled gradients in one tf.function,
        # traced before the first apply builds the optimizer; the apply in another.
        v = _var([1.0, 1.0])
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(1.0), initial_scale=1024.0)

        @tf.function
        def scaled_gradients():
            with tf.GradientTape() as tape:
                loss = ops.sum(v * _grad([1.0, 2.0]))
                scaled = opt.get_scaled_loss(loss)
            grads = opt.get_unscaled_gradients(tape.gradient(scaled, [v]))
            return scaled / loss, grads

        ratio, grads = scaled_gradients()
        self.assertEqual(float(ratio), 1024.0)
        opt.apply_gradients(zip(grads, [v], strict=True))
        opt.apply([_grad([np.nan, 1.0])], [v])  # skipped: the scale halves to 512
        self.assertEqual(_scale(opt), 512.0)
        ratio, grads = scaled_gradients()
        self.assertEqual(float(ratio), 512.0)
        self.assertAllClose(grads[0], [1.0, 2.0])
        opt.apply_gradients(zip(grads, [v], strict=True))
        self.assertAllClose(v, [-1.0, -3.0])

    def test_unscaled_gradients_never_applied_do_not_skip_the_next_unscaling(self):
        v = _var([1.0, 1.0])
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(1.0), initial_scale=1024.0)
        opt.build([v])
        # Step 1 scales its loss and unscales its gradients, then is abandoned.
        opt.get_scaled_loss(1.0)
        opt.get_unscaled_gradients([_grad([1024.0, 1024.0])])
        # Step 2, Keras 3 style: the scaled gradients of [2, 2].
        opt.scale_loss(1.0)
        opt.apply([_grad([2048.0, 2048.0])], [v])
        self.assertAllClose(v, [-1.0, -1.0])

    @parameterized.named_parameters(("eager", False), ("tf_function", True))
    @requires_tensorflow
    def test_unscaled_gradients_may_be_clipped_or_summed_before_apply(self, compiled):
        v = _var([0.0, 0.0])
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(1.0), initial_scale=2.0**15)
        opt.build([v])

        def step(g1, g2):
            opt.get_scaled_loss(1.0)
            a = opt.get_unscaled_gradients([g1])[0]
            b = opt.get_unscaled_gradients([g2])[0]  # two micro-batches, summed
            clipped, _ = tf.clip_by_global_norm([a + b], 1.0)  # PyTorch's unscale_-then-clip
            opt.apply(clipped, [v])

        step = tf.function(step) if compiled else step
        scale = 2.0**15
        step(_grad([600.0 * scale, 0.0]), _grad([0.0, 800.0 * scale]))  # norm 1000 -> 1
        self.assertAllClose(v, [-0.6, -0.8], rtol=1e-5)

    @requires_tensorflow
    def test_unscaled_gradients_per_replica(self):
        # Each replica unscales its own gradients; the all-reduce sums them once.
        strategy = two_replica_strategy()
        with strategy.scope():
            v = keras.Variable(np.zeros(2, "float32"))
            opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(1.0), initial_scale=2.0**15)
            opt.build([v])

        @tf.function
        def step():
            def replica_fn():
                rid = tf.distribute.get_replica_context().replica_id_in_sync_group
                true = tf.ones(2) * tf.gather(tf.constant([1.0, 300.0]), rid)
                opt.scale_loss(1.0)
                opt.apply(opt.get_unscaled_gradients([true * 2.0**15]), [v])
            strategy.run(replica_fn)

        step()
        for value in strategy.experimental_local_results(v):
            self.assertAllClose(value, [-301.0, -301.0])

    def test_unscaling_keeps_overwrite_with_gradient_variables(self):
        w, amax = _var([0.0, 0.0]), _var([0.0, 0.0])
        amax.overwrite_with_gradient = True  # float8 scale/amax variables
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(1.0), initial_scale=1024.0)
        opt.apply(opt.get_unscaled_gradients([_grad([1024.0, 1024.0]), _grad([3.0, 5.0])]),
                  [w, amax])
        self.assertAllClose(w, [-1.0, -1.0])
        self.assertAllClose(amax, [3.0, 5.0])
        opt.apply([_grad([1024.0, 1024.0]), _grad([4.0, 6.0])], [w, amax])
        self.assertAllClose(amax, [4.0, 6.0])

    def test_stock_has_no_tf_keras_api(self):
        stock = STOCK(keras.optimizers.SGD(0.05))
        self.assertFalse(hasattr(stock, "get_scaled_loss"))
        self.assertFalse(hasattr(stock, "get_unscaled_gradients"))

    @requires_tensorflow
    def test_unscaled_in_one_function_applied_in_another(self):
        v = _var([1.0, 1.0])
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(1.0), initial_scale=1024.0)

        @tf.function
        def grads():
            return opt.get_unscaled_gradients([_grad([1024.0, 2048.0])])

        for step in range(3):  # built after the first apply: the flag is then a variable
            opt.apply_gradients(zip(grads(), [v], strict=True))
            self.assertAllClose(v, [1.0 - (step + 1), 1.0 - 2 * (step + 1)])
        # The flag lasts one apply: scaled gradients are divided again afterwards.
        opt.apply([_grad([1024.0, 1024.0])], [v])
        self.assertAllClose(v, [-3.0, -6.0])

    @requires_tensorflow
    def test_mixed_float16_custom_loop_keeps_weights_finite(self):
        keras.config.set_dtype_policy("mixed_float16")
        x, y = _regression_data()
        model = _mlp()
        opt = tfmp.LossScaleOptimizer(keras.optimizers.Adam(0.01), initial_scale=2.0**24)
        for _ in range(5):
            with tf.GradientTape() as tape:
                loss = ops.mean((ops.cast(model(x), "float32") - y) ** 2)
                scaled = opt.get_scaled_loss(loss)
            grads = opt.get_unscaled_gradients(tape.gradient(scaled, model.trainable_variables))
            opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        # 2**24 overflows float16 activations' gradients: steps were skipped
        # and the scale came down, and no weight is non-finite.
        self.assertGreater(_int(opt.skipped_steps), 0)
        self.assertLess(_scale(opt), 2.0**24)
        self.assertAllFinite(model.get_weights())


@requires_tensorflow
class DistributeTest(TestCase):
    """Stock failure 3: only replica 0's gradients were checked."""

    def _inf_on_replica_one(self, cls):
        """An inf gradient on replica 1 only; returns the optimizer and each replica's weights."""
        strategy = two_replica_strategy()
        with strategy.scope():
            v = keras.Variable(np.array([1.0, 2.0], "float32"))
            opt = cls(keras.optimizers.SGD(0.5), initial_scale=1.0)
            opt.build([v])

        @tf.function
        def step():
            def replica_fn():
                rid = tf.distribute.get_replica_context().replica_id_in_sync_group
                g = tf.where(rid == 1, tf.constant([np.inf, 1.0]), tf.constant([1.0, 1.0]))
                opt.apply([g], [v])
            strategy.run(replica_fn)

        step()
        return opt, [value.numpy() for value in strategy.experimental_local_results(v)]

    def test_inf_on_one_replica_skips_on_all(self):
        opt, replicas = self._inf_on_replica_one(tfmp.LossScaleOptimizer)
        for value in replicas:
            np.testing.assert_array_equal(value, [1.0, 2.0])
        self.assertEqual(_int(opt.skipped_steps), 1)
        self.assertEqual(_scale(opt), 1.0)

    def test_stock_applies_inf_from_replica_one(self):
        _, replicas = self._inf_on_replica_one(STOCK)
        self.assertFalse(all(np.isfinite(value).all() for value in replicas), replicas)

    def _fit_with_nan_in_second_half(self, cls):
        """Returns the model's weights before and after one step with a NaN on replica 1."""
        strategy = two_replica_strategy()
        keras.config.set_dtype_policy("mixed_float16")
        x, y = _regression_data(8)
        x[6, 1] = np.nan  # the second replica's half of the batch
        with strategy.scope():
            model = _mlp()
            # A small scale: replica 0's float16 gradients must not overflow.
            opt = cls(keras.optimizers.SGD(0.01), initial_scale=16.0)
            model.compile(optimizer=opt, loss="mse")
        before = model.get_weights()
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        return model.optimizer, before, model.get_weights()

    def test_fit_skips_batch_with_nan_on_one_replica(self):
        opt, before, after = self._fit_with_nan_in_second_half(tfmp.LossScaleOptimizer)
        for a, b in zip(before, after, strict=True):
            np.testing.assert_array_equal(a, b)
        self.assertEqual(_int(opt.skipped_steps), 1)

    def test_stock_fit_writes_nan_into_weights(self):
        _, _, after = self._fit_with_nan_in_second_half(STOCK)
        self.assertTrue(any(np.isnan(w).any() for w in after), after)


class SerializationTest(TestCase):
    FULL = dict(initial_scale=64.0, dynamic_growth_steps=7, dynamic=True, growth_factor=3.0,
                backoff_factor=0.25, min_scale=2.0, max_scale=1024.0, hysteresis=2,
                enabled=False, skip_nonfinite=False, name="lso")

    def test_config_round_trip(self):
        opt = tfmp.LossScaleOptimizer(keras.optimizers.Adam(0.003), **self.FULL)
        config = opt.get_config()
        restored = tfmp.LossScaleOptimizer.from_config(config)
        self.assertEqual(restored.get_config(), config)
        for key, value in self.FULL.items():
            self.assertEqual(getattr(restored, key), value, key)
        self.assertIsInstance(restored.inner_optimizer, keras.optimizers.Adam)
        again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
        self.assertIsInstance(again, tfmp.LossScaleOptimizer)
        self.assertEqual(again.get_config(), config)

    def test_stock_configs_load(self):
        stock = STOCK(keras.optimizers.SGD(0.5), initial_scale=8.0, dynamic_growth_steps=3)
        opt = tfmp.LossScaleOptimizer.from_config(stock.get_config())
        self.assertEqual((opt.initial_scale, opt.dynamic_growth_steps), (8.0, 3))
        legacy = dict(stock.get_config(), weight_decay=None, clipnorm=None, use_ema=False,
                      ema_momentum=0.99, loss_scale_factor=None)
        tfmp.LossScaleOptimizer.from_config(legacy)

    def _trained_model(self, optimizer):
        keras.config.set_dtype_policy("mixed_float16")
        x, y = _regression_data(16)
        model = _mlp()
        model.compile(optimizer=optimizer, loss="mse")
        x_bad = x.copy()
        x_bad[0, 0] = np.inf
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)
        model.fit(x_bad[:8], y[:8], batch_size=8, epochs=1, verbose=0)  # one skipped step
        return model

    def _state(self, opt):
        return {
            "class": type(opt).__name__,
            "scale": _scale(opt),
            "skipped": _int(getattr(opt, "skipped_steps", -1)),
            "counter": _int(opt.step_counter) if hasattr(opt, "step_counter") else -1,
            "iterations": _int(opt.iterations),
        }

    def _save_and_load_under_float32(self, optimizer):
        """Returns the optimizer state before saving and after loading under float32."""
        model = self._trained_model(optimizer)
        expected = self._state(model.optimizer)
        path = os.path.join(self.tmp_dir(), "m.keras")
        model.save(path)
        keras.config.set_dtype_policy("float32")
        loaded = keras.saving.load_model(path)
        return expected, self._state(loaded.optimizer)

    def test_keras_file_keeps_state_under_other_policy(self):
        saved, loaded = self._save_and_load_under_float32(
            tfmp.LossScaleOptimizer(keras.optimizers.Adam(1e-3), dynamic_growth_steps=3))
        self.assertEqual(loaded, saved)
        self.assertGreaterEqual(saved["skipped"], 1)

    def test_stock_compile_adam_loses_state(self):
        saved, loaded = self._save_and_load_under_float32("adam")
        self.assertEqual(saved["class"], "LossScaleOptimizer")
        self.assertEqual(loaded["class"], "Adam")  # the loss-scale wrapper is gone
        self.assertEqual(loaded["scale"], 1.0)

    @requires_tensorflow
    def test_tf_checkpoint_keeps_state(self):
        model = self._trained_model(tfmp.LossScaleOptimizer(keras.optimizers.Adam(1e-3)))
        expected = self._state(model.optimizer)
        prefix = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(
            os.path.join(self.tmp_dir(), "ckpt"))
        keras.config.set_dtype_policy("float32")
        fresh = _mlp()
        opt = tfmp.LossScaleOptimizer(keras.optimizers.Adam(1e-3))
        opt.build(fresh.trainable_variables)
        tf.train.Checkpoint(model=fresh, optimizer=opt).restore(prefix).assert_consumed()
        self.assertEqual(self._state(opt), expected)


class ValidationTest(TestCase):
    @parameterized.named_parameters(
        ("growth_factor", dict(growth_factor=1.0), "`growth_factor` must be > 1. Received: "
         "growth_factor=1.0"),
        ("backoff_high", dict(backoff_factor=1.0), r"`backoff_factor` must be in \(0, 1\)"),
        ("backoff_zero", dict(backoff_factor=0.0), "backoff_factor=0.0"),
        ("min_gt_max", dict(min_scale=8.0, max_scale=4.0, initial_scale=4.0),
         r"`min_scale` must be <= max_scale \(4.0\). Received: min_scale=8.0"),
        ("min_zero", dict(min_scale=0.0), r"`min_scale` must be in float32's normal range"),
        ("min_below_float32", dict(min_scale=1e-46, initial_scale=1e-46),
         r"`initial_scale` must be in float32's normal range \[1.175e-38, 3.403e\+38\]. "
         r"Received: initial_scale=1e-46"),
        ("max_inf", dict(max_scale=float("inf")), "Received: max_scale=inf"),
        ("max_past_float32", dict(max_scale=1e39), "Received: max_scale=1e\\+39"),
        ("growth_none", dict(growth_factor=None), "`growth_factor` must be a number. "
         "Received: growth_factor=None"),
        ("initial_string", dict(initial_scale="big"), "`initial_scale` must be a number"),
        ("initial_high", dict(initial_scale=2.0**30), r"`initial_scale` must be in \[min_scale"),
        ("initial_low", dict(initial_scale=0.5), "Received: initial_scale=0.5"),
        ("hysteresis", dict(hysteresis=0), "`hysteresis` must be an integer >= 1"),
        ("growth_steps", dict(dynamic_growth_steps=0), "`dynamic_growth_steps` must be"),
        # Keras' wording: 3.12 and later, then 3.11 (the minimum pin).
        ("unknown", dict(foo=1), r"arguments: `foo`|not recognized: \{'foo': 1\}"),
        ("dynamic_string", dict(dynamic="False"),
         "`dynamic` must be True or False. Received: dynamic='False'"),
        ("enabled_int", dict(enabled=1), "`enabled` must be True or False. Received: enabled=1"),
        ("skip_string", dict(skip_nonfinite="yes"), "`skip_nonfinite` must be True or False"),
        ("fixed_with_growth_steps", dict(dynamic=False, dynamic_growth_steps=7),
         r"`dynamic_growth_steps` must be None with dynamic=False \(a fixed scale never "
         r"grows\). Received: dynamic_growth_steps=7"),
        ("growth_steps_float", dict(dynamic_growth_steps=2.5), "`dynamic_growth_steps` must be"),
        ("hysteresis_bool", dict(hysteresis=True), "`hysteresis` must be an integer >= 1"),
        ("scaling_without_skipping", dict(skip_nonfinite=False),
         "`skip_nonfinite` must be True when enabled=True"),
    )
    def test_bad_arguments(self, kwargs, message):
        with self.assertRaisesRegex(ValueError, message):
            tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.1), **kwargs)

    def test_numpy_and_int_arguments_are_stored_as_python_numbers(self):
        opt = tfmp.LossScaleOptimizer(
            keras.optimizers.SGD(0.1), np.float32(1024), np.int64(7), hysteresis=np.int32(2),
            max_scale=2**20, dynamic=np.bool_(True))
        self.assertEqual((opt.initial_scale, opt.dynamic_growth_steps, opt.hysteresis),
                         (1024.0, 7, 2))
        self.assertIs(type(opt.initial_scale), float)
        self.assertIs(type(opt.max_scale), float)
        self.assertIs(type(opt.dynamic_growth_steps), int)
        int_scale = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=2)
        self.assertIs(type(int_scale.get_config()["initial_scale"]), float)

    def test_fixed_scale_has_no_growth_steps(self):
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.1), dynamic=False)
        self.assertIsNone(opt.dynamic_growth_steps)
        config = opt.get_config()
        self.assertIsNone(config["dynamic_growth_steps"])
        self.assertEqual(tfmp.LossScaleOptimizer.from_config(config).get_config(), config)
        # tfmp 0.1 saved the unused count with a fixed scale: such files still load.
        legacy = dict(config, dynamic_growth_steps=7)
        self.assertIsNone(tfmp.LossScaleOptimizer.from_config(legacy).dynamic_growth_steps)

    def test_one_inner_optimizer_cannot_have_two_wrappers(self):
        inner = keras.optimizers.SGD(0.1)
        first = tfmp.LossScaleOptimizer(inner, name="first")
        with self.assertRaisesRegex(
                ValueError, "`inner_optimizer` is already wrapped by another "
                "LossScaleOptimizer \\('first'\\)"):
            tfmp.LossScaleOptimizer(inner)
        del first  # once the first wrapper is gone, the optimizer may be wrapped again
        gc.collect()
        tfmp.LossScaleOptimizer(inner)

    def test_empty_variable_list_is_not_all_variables(self):
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(1.0), initial_scale=1.0)
        a, b = _var(), _var()
        opt.build([a, b])
        with self.assertRaisesRegex(ValueError, "Received: 2 gradients for 0 variables"):
            opt.apply([_grad([1.0, 1.0])] * 2, [])
        # A failed first call does not build the optimizer on the wrong variables.
        fresh = tfmp.LossScaleOptimizer(keras.optimizers.SGD(1.0), initial_scale=1.0)
        with self.assertRaisesRegex(ValueError, "Received: 1 gradients for 0 variables"):
            fresh.apply([_grad([1.0, 1.0])], [])
        self.assertFalse(fresh.built)
        fresh.apply([_grad([1.0, 1.0])], [a])
        self.assertAllClose(a, [0.0, 1.0])
        opt.apply([], [])  # nothing to apply
        self.assertAllClose(b, [1.0, 2.0])
        self.assertEqual(_int(opt.iterations), 0)

    def test_apply_misuse(self):
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.1))
        with self.assertRaisesRegex(ValueError, "must already be built"):
            opt.apply([_grad([1.0, 1.0])])
        a, b = _var(), _var()
        opt.build([a])
        with self.assertRaisesRegex(ValueError, "Unknown variable"):
            opt.apply([_grad([1.0, 1.0])], [b])
        with self.assertRaisesRegex(ValueError, "Received: 2 gradients for 1 variables"):
            opt.apply([_grad([1.0, 1.0])] * 2)

    def test_inner_must_be_optimizer(self):
        with self.assertRaisesRegex(ValueError, "`inner_optimizer` must be a `keras.optimizers"):
            tfmp.LossScaleOptimizer("adam")

    @parameterized.named_parameters(("tfmp", tfmp.LossScaleOptimizer), ("stock", STOCK))
    def test_cannot_wrap_twice(self, inner_cls):
        with self.assertRaisesRegex(ValueError, "cannot be wrapped again"):
            tfmp.LossScaleOptimizer(inner_cls(keras.optimizers.SGD(0.1)))

    def test_compile_does_not_rewrap(self):
        keras.config.set_dtype_policy("mixed_float16")
        model = _mlp()
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.1))
        model.compile(optimizer=opt, loss="mse")
        self.assertIs(model.optimizer, opt)
