"""Tests that tfmp.LossScaleOptimizer lets no non-finite value into any model variable.

Each case is one way a value used to get through: finite gradients whose
squares overflow, 16-bit gradients divided by a 16-bit scale, runs without loss
scaling, sparse gradients, the forward pass writing non-trainable state, and
the `tf.distribute` branch taken without merge calls.
"""

import itertools
from unittest import mock

import keras
import numpy as np
from absl.testing import parameterized
from keras import ops

import tfmp
from tests.base import TestCase, apply_step, requires_tensorflow, tf, two_replica_strategy

STOCK = keras.optimizers.LossScaleOptimizer

_OPTIMIZERS = {
    "adam": lambda **kw: keras.optimizers.Adam(1e-3, **kw),
    "adamw": lambda **kw: keras.optimizers.AdamW(1e-3, weight_decay=kw.pop("weight_decay", 0.004),
                                                 **kw),
    "sgd_momentum": lambda **kw: keras.optimizers.SGD(1e-3, momentum=0.9, **kw),
}
_FEATURES = {
    "plain": {},
    "clipnorm": {"clipnorm": 1.0},
    "global_clipnorm": {"global_clipnorm": 1.0},
    "clipvalue": {"clipvalue": 0.5},
    "weight_decay": {"weight_decay": 0.01},
    "ema": {"use_ema": True, "ema_overwrite_frequency": 1},
    "accumulation": {"gradient_accumulation_steps": 2},
}
# Squares of 1e19 (1e38) fit float32; those of 1e20 do not.
_APPLIED = (1e-30, 1e-10, 1.0, 1e10, 1e19)
_SKIPPED = (1e20, 1e30)


def _all_finite(values) -> bool:
    return all(np.isfinite(np.asarray(ops.convert_to_numpy(v), "float64")).all() for v in values)


class UpdateStaysFiniteTest(TestCase):
    """Issue case: finite gradients whose squares overflow float32 poisoned the weights."""

    def _run(self, cls, optimizer, feature, magnitude):
        v = keras.Variable(np.array([1.0, -2.0], "float32"))
        opt = cls(_OPTIMIZERS[optimizer](**_FEATURES[feature]), initial_scale=1.0)
        for _ in range(4):
            apply_step(opt, [ops.convert_to_tensor(np.array([magnitude, -magnitude], "float32"))],
                       [v])
        return opt, v

    @parameterized.named_parameters(
        (f"{o}_{f}", o, f) for o, f in itertools.product(_OPTIMIZERS, _FEATURES))
    def test_weights_and_slots_stay_finite(self, optimizer, feature):
        for magnitude in _APPLIED + _SKIPPED:
            opt, v = self._run(tfmp.LossScaleOptimizer, optimizer, feature, magnitude)
            self.assertTrue(_all_finite([v]), f"weights {v.numpy()} at {magnitude:g}")
            self.assertTrue(_all_finite(opt.variables), f"optimizer state at {magnitude:g}")
            skipped = int(ops.convert_to_numpy(opt.skipped_steps))
            self.assertEqual(skipped, 4 if magnitude in _SKIPPED else 0, f"at {magnitude:g}")
            if magnitude >= 1.0 and magnitude in _APPLIED:
                self.assertFalse(np.allclose(v.numpy(), [1.0, -2.0]), f"not applied: {magnitude}")

    @parameterized.named_parameters(
        ("adam_slots", "adam", "plain", lambda opt, v: _all_finite(opt.variables)),
        ("global_clipnorm_weights", "sgd_momentum", "global_clipnorm",
         lambda opt, v: _all_finite([v])),
    )
    def test_stock_lets_squares_overflow(self, optimizer, feature, finite):
        opt, v = self._run(STOCK, optimizer, feature, 1e20)
        self.assertEqual(int(ops.convert_to_numpy(opt.step_counter)), 4)  # nothing skipped
        self.assertFalse(finite(opt, v))


class SixteenBitGradientTest(TestCase):
    """Issue case: 16-bit gradients were divided by the scale cast to float16 (inf)."""

    @parameterized.named_parameters(
        ("float16_scale_2_16", "float16", 2.0**16),
        ("float16_scale_2_20", "float16", 2.0**20),
        ("bfloat16_scale_2_16", "bfloat16", 2.0**16),
    )
    def test_16bit_variable_is_updated(self, dtype, scale):
        keras.config.set_dtype_policy(dtype)
        v = keras.Variable(np.ones(2, "float32"), dtype=dtype)
        self.assertEqual(keras.backend.standardize_dtype(v.dtype), dtype)
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(1.0), initial_scale=scale)
        # The scaled gradient of 0.01 * 65536 / scale per element, representable in dtype.
        grad = ops.convert_to_tensor(np.full(2, 655.36, "float32"), dtype)
        apply_step(opt, [grad], [v])
        self.assertFalse(bool(opt.last_step_skipped))
        expected = 1.0 - float(ops.convert_to_numpy(ops.cast(grad, "float32"))[0]) / scale
        self.assertAllClose(ops.cast(v, "float32"), [expected] * 2, rtol=2e-3, atol=0)
        self.assertNotEqual(float(ops.convert_to_numpy(ops.cast(v, "float32"))[0]), 1.0)

    @parameterized.named_parameters(("global_clipnorm", {"global_clipnorm": 1.0}),
                                    ("clipnorm", {"clipnorm": 1.0}), ("adam", {}))
    def test_float16_variables_with_float16_sums(self, kwargs):
        # Keras sums float16 squares in float16: 100x100 gradients of 20 sum to 4e6.
        keras.config.set_dtype_policy("float16")
        v = keras.Variable(np.ones((100, 100), "float32"), dtype="float16")
        inner = (keras.optimizers.Adam(1e-3) if not kwargs
                 else keras.optimizers.SGD(1e-3, **kwargs))
        opt = tfmp.LossScaleOptimizer(inner, initial_scale=1.0)
        apply_step(opt, [ops.full((100, 100), 20.0, "float16")], [v])
        self.assertTrue(bool(opt.last_step_skipped))
        self.assertTrue(_all_finite([v] + opt.variables))
        apply_step(opt, [ops.full((100, 100), 0.5, "float16")], [v])  # a sum of 2500 is fine
        self.assertFalse(bool(opt.last_step_skipped))
        self.assertTrue(_all_finite([v] + opt.variables))

    def test_stock_updates_the_float16_variable(self):
        keras.config.set_dtype_policy("float16")
        v = keras.Variable(np.ones(2, "float32"), dtype="float16")
        opt = STOCK(keras.optimizers.SGD(1.0), initial_scale=2.0**16)
        apply_step(opt, [ops.convert_to_tensor(np.full(2, 655.36, "float16"))], [v])
        self.assertAllClose(ops.cast(v, "float32"), [0.99, 0.99], rtol=2e-3)


def _nan_batch(x):
    x = x.copy()
    x[0, 0] = np.nan
    return x


def _data(n=8, features=4):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, features)).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


def _dense(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])


def _batchnorm_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
                             keras.layers.BatchNormalization(), keras.layers.Dense(1)])


class SkipWithoutScalingTest(TestCase):
    """Issue case: enabled=False also turned skipping off, so bfloat16/float32 runs were bare."""

    @parameterized.named_parameters(
        ("float32", "float32"), ("mixed_bfloat16", "mixed_bfloat16"),
        ("mixed_float16", "mixed_float16"))
    def test_nan_batch_is_skipped_without_scaling(self, policy):
        keras.config.set_dtype_policy(policy)
        x, y = _data()
        model = _dense()
        opt = tfmp.LossScaleOptimizer(keras.optimizers.Adam(0.01), enabled=False)
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, batch_size=8, verbose=0)
        before = model.get_weights()
        model.fit(_nan_batch(x), y, batch_size=8, verbose=0)
        for a, b in zip(before, model.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
        self.assertEqual(opt.stats()["skipped_steps"], 1)
        self.assertEqual(opt.stats()["loss_scale"], 1.0)
        self.assertEqual(float(ops.convert_to_numpy(opt.scale_loss(3.0))), 3.0)

    def test_skip_nonfinite_false_passes_gradients_through(self):
        v = keras.Variable(np.ones(2, "float32"))
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(1.0), enabled=False,
                                      skip_nonfinite=False)
        opt.apply([ops.convert_to_tensor([np.nan, 1.0])], [v])
        self.assertTrue(np.isnan(v.numpy()[0]))
        self.assertAllClose(v.numpy()[1], 0.0)

    def test_stock_compile_under_bfloat16_writes_nan(self):
        keras.config.set_dtype_policy("mixed_bfloat16")
        x, y = _data()
        model = _dense()
        model.compile(optimizer="adam", loss="mse")  # Keras wraps nothing under bfloat16
        model.fit(_nan_batch(x), y, batch_size=8, verbose=0)
        self.assertTrue(any(np.isnan(w).any() for w in model.get_weights()))


@requires_tensorflow
class SparseGradientTest(TestCase):
    """Issue case: Embedding gradients (IndexedSlices) were densified for the check."""

    VOCAB, DIM = 50_000, 8

    def _slices(self, values, indices):
        return tf.IndexedSlices(tf.constant(values, tf.float32), tf.constant(indices),
                                tf.constant([self.VOCAB, self.DIM]))

    def test_no_dense_vocabulary_tensor_in_the_step(self):
        table = keras.Variable(np.zeros((self.VOCAB, self.DIM), "float32"))
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(1.0), initial_scale=4.0)
        opt.build([table])
        spec = tf.IndexedSlicesSpec(shape=[self.VOCAB, self.DIM], dtype=tf.float32,
                                    indices_dtype=tf.int32, dense_shape_dtype=tf.int32)
        graph_def = tf.function(lambda g: opt.apply([g], [table])).get_concrete_function(
            spec).graph.as_graph_def()
        op_types = {node.op for node in graph_def.node}
        op_types |= {node.op for f in graph_def.library.function for node in f.node_def}
        self.assertTrue(op_types & {"If", "StatelessIf"})  # the cond branches are included
        # IndexedSlices -> dense goes through UnsortedSegmentSum (or ScatterNd).
        self.assertFalse(op_types & {"UnsortedSegmentSum", "ScatterNd"}, sorted(op_types))

    def test_sparse_step_applied_and_skipped(self):
        table = keras.Variable(np.zeros((self.VOCAB, self.DIM), "float32"))
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(1.0), initial_scale=4.0)
        opt.apply([self._slices(np.full((2, self.DIM), 4.0), [3, 7])], [table])
        rows = table.numpy()
        np.testing.assert_array_equal(rows[[3, 7]], -np.ones((2, self.DIM)))
        self.assertEqual(float(np.abs(rows).sum()), 2.0 * self.DIM)
        bad = np.full((2, self.DIM), 4.0)
        bad[1, 0] = np.nan
        opt.apply([self._slices(bad, [3, 7])], [table])
        self.assertTrue(bool(opt.last_step_skipped))
        np.testing.assert_array_equal(table.numpy(), rows)

    def test_repeated_rows_bound_the_dense_norm(self):
        # Two rows of 1.5e19 on one index sum to 3e19, whose square overflows float32.
        table = keras.Variable(np.zeros((4, 1), "float32"))
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(1e-3, global_clipnorm=1.0),
                                      initial_scale=1.0)
        opt.apply([tf.IndexedSlices(tf.constant([[1.5e19], [1.5e19]]), tf.constant([1, 1]),
                                    tf.constant([4, 1]))], [table])
        self.assertTrue(bool(opt.last_step_skipped))
        self.assertTrue(_all_finite([table] + opt.variables))

    def test_embedding_model_trains_with_sparse_gradients(self):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((3,), dtype="int32"),
                                  keras.layers.Embedding(self.VOCAB, self.DIM),
                                  keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1)])
        opt = tfmp.LossScaleOptimizer(keras.optimizers.Adam(0.01), initial_scale=8.0)
        model.compile(optimizer=opt, loss="mse")
        x = np.array([[1, 2, 3], [4, 5, 6]], "int32")
        history = model.fit(x, np.ones((2, 1), "float32"), epochs=3, verbose=0)
        self.assertLess(history.history["loss"][-1], history.history["loss"][0])
        self.assertEqual(opt.stats()["skipped_steps"], 0)


class GuardStateTest(TestCase):
    """Issue case: one NaN pixel wrote NaN into every batch-norm statistic."""

    def _statistics(self, model):
        return [v.numpy().copy() for v in model.non_trainable_variables]

    @parameterized.named_parameters(
        ("mixed_float16", "mixed_float16", True), ("mixed_bfloat16", "mixed_bfloat16", False),
        ("float32", "float32", False))
    def test_fit_with_monitor_keeps_statistics_on_nan_batch(self, policy, scaling):
        keras.config.set_dtype_policy(policy)
        x, y = _data(16)
        model = _batchnorm_model()
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=64.0,
                                      enabled=scaling)
        model.compile(optimizer=opt, loss="mse")
        monitor = tfmp.callbacks.LossScaleMonitor()
        model.fit(x, y, batch_size=8, verbose=0, shuffle=False, callbacks=[monitor])
        before = self._statistics(model)
        model.fit(_nan_batch(x[:8]), y[:8], batch_size=8, verbose=0, callbacks=[monitor])
        for a, b in zip(before, self._statistics(model), strict=True):
            np.testing.assert_array_equal(a, b)
        self.assertEqual(opt.stats()["skipped_steps"], 1)
        evaluated = model.evaluate(x, y, verbose=0)
        self.assertTrue(np.isfinite(evaluated))
        self.assertTrue(_all_finite([model.predict(x, verbose=0)]))

    def test_recompiled_with_a_plain_optimizer_updates_statistics_again(self):
        # On JAX the guard wraps the model's train_step; with another optimizer
        # compiled in, it must not read that optimizer's variables as counters.
        x, y = _data(16)
        model = _batchnorm_model()
        model.compile(optimizer=tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.01)), loss="mse")
        model.fit(x, y, batch_size=8, verbose=0, callbacks=[tfmp.callbacks.LossScaleMonitor()])
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        before = self._statistics(model)
        model.fit(x + 1.0, y, batch_size=8, verbose=0)
        for a, b in zip(before, self._statistics(model), strict=True):
            self.assertFalse(np.array_equal(a, b), "batch-norm statistics did not move")

    @parameterized.named_parameters(("subclassed", True), ("sequential_without_input", False))
    def test_model_built_by_its_first_batch_is_guarded(self, subclassed):
        class Sub(keras.Model):
            def __init__(self):
                super().__init__()
                self.d, self.bn = keras.layers.Dense(8), keras.layers.BatchNormalization()
                self.o = keras.layers.Dense(1)

            def call(self, x, training=False):
                return self.o(self.bn(self.d(x), training=training))

        keras.utils.set_random_seed(0)
        model = Sub() if subclassed else keras.Sequential(
            [keras.layers.Dense(8), keras.layers.BatchNormalization(), keras.layers.Dense(1)])
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.01))
        model.compile(optimizer=opt, loss="mse")
        x, y = _data(16)
        x[12, 0] = np.nan  # the second batch
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0,
                  callbacks=[tfmp.callbacks.LossScaleMonitor()])
        self.assertEqual(opt.stats()["skipped_steps"], 1)
        self.assertEqual(len(opt.guarded_variables), 2)
        self.assertTrue(_all_finite(model.non_trainable_variables))

    def test_stock_writes_nan_into_statistics(self):
        keras.config.set_dtype_policy("mixed_float16")
        x, y = _data(8)
        model = _batchnorm_model()
        model.compile(optimizer="sgd", loss="mse")  # Keras' own LossScaleOptimizer
        model.fit(_nan_batch(x), y, batch_size=8, verbose=0)
        self.assertTrue(all(np.isnan(v).all() for v in self._statistics(model)))

    @requires_tensorflow
    def test_custom_loop_with_guard_state(self):
        x, y = _data(8)
        model = _batchnorm_model()
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=64.0)
        opt.build(model.trainable_variables)
        opt.guard_state(model)

        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                loss = ops.mean((model(x, training=True) - y) ** 2)
                scaled = opt.get_scaled_loss(loss)
            grads = opt.get_unscaled_gradients(tape.gradient(scaled, model.trainable_variables))
            opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))

        step(x)
        before = self._statistics(model)
        self.assertFalse(np.array_equal(before[0], np.zeros_like(before[0])))
        step(_nan_batch(x))
        for a, b in zip(before, self._statistics(model), strict=True):
            np.testing.assert_array_equal(a, b)
        step(x)  # a clean step after the skip updates the statistics again
        self.assertFalse(np.array_equal(before[0], self._statistics(model)[0]))
        self.assertEqual(opt.stats()["nonfinite_loss_steps"], 1)

    @requires_tensorflow
    def test_mirrored_fit_keeps_each_replicas_statistics(self):
        strategy = two_replica_strategy()
        x, y = _data(16)
        x[12, 0] = np.nan  # the second replica's half of the second batch
        with strategy.scope():
            model = _batchnorm_model()
            opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=64.0)
            model.compile(optimizer=opt, loss="mse")
        stats = []
        spy = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: stats.append(
            [[r.numpy().copy() for r in strategy.experimental_local_results(v.value)]
             for v in model.non_trainable_variables]))
        model.fit(x, y, batch_size=8, verbose=0, shuffle=False,
                  callbacks=[tfmp.callbacks.LossScaleMonitor(), spy])
        for variable_after_1, variable_after_2 in zip(stats[0], stats[1], strict=True):
            for replica_after_1, replica_after_2 in zip(variable_after_1, variable_after_2,
                                                        strict=True):
                np.testing.assert_array_equal(replica_after_1, replica_after_2)
        self.assertEqual(opt.stats()["skipped_steps"], 1)


@requires_tensorflow
class NoMergeCallTest(TestCase):
    """The branch for strategies without merge calls (several GPUs with XLA), forced on 2 CPUs.

    XLA cannot compile one step over two CPU devices ("Trying to access resource
    ... located in device CPU:1 from device CPU:0"), so the branch is forced
    with `_use_merge_call` returning False, without `jit_compile`.
    """

    def _fit(self, strategy, force_no_merge_call):
        x, y = _data(32)
        x[19, 0] = np.nan  # the first replica's half of the third batch
        patch = (mock.patch.object(type(strategy.extended), "_use_merge_call", lambda self: False)
                 if force_no_merge_call else mock.patch.dict({}))
        with patch, strategy.scope():
            model = _dense()
            opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.05, global_clipnorm=0.5),
                                          initial_scale=64.0)
            model.compile(optimizer=opt, loss="mse")
            if force_no_merge_call:
                self.assertTrue(tf.__internal__.distribute.strategy_supports_no_merge_call()
                                if tf.distribute.has_strategy() else False)
            model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
        return model.get_weights(), opt.stats()

    def test_matches_one_device(self):
        strategy = two_replica_strategy()
        weights2, stats2 = self._fit(strategy, force_no_merge_call=True)
        keras.backend.clear_session()
        weights1, stats1 = self._fit(tf.distribute.get_strategy(), force_no_merge_call=False)
        self.assertEqual(stats2, stats1)
        self.assertEqual(stats2["skipped_steps"], 2)
        for a, b in zip(weights2, weights1, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
