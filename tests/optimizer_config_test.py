"""Tests for tfmp/optimizer_config.py: optimizer, schedule, weight decay, accumulation."""

import os

import keras
import numpy as np
from absl.testing import parameterized
from keras import ops

import tfmp
from tests.base import TestCase
from tfmp import optimizer_config
from tfmp.optimizer_config import OptimizerConfig


def _lr(schedule, step):
    return float(ops.convert_to_numpy(schedule(step)))


def _schedule(total_steps=100, global_batch_size=256, **kwargs):
    return optimizer_config.learning_rate_schedule(
        OptimizerConfig(**kwargs), total_steps=total_steps, global_batch_size=global_batch_size)


class ScheduleTest(TestCase):

    def test_cosine_warms_up_and_decays(self):
        schedule = _schedule(learning_rate=0.1, lr_schedule="cosine", warmup_steps=10)
        # Linear from 0 over 10 steps, then cos from 0.1 to 0 over the 90 left.
        expected = {0: 0.0, 5: 0.05, 10: 0.1, 55: 0.05, 100: 0.0}
        for step, lr in expected.items():
            self.assertAlmostEqual(_lr(schedule, step), lr, places=6, msg=f"step {step}")
        self.assertLess(_lr(schedule, 80), _lr(schedule, 30))

    def test_step_schedule_counts_boundaries_from_the_start(self):
        schedule = _schedule(learning_rate=1.0, lr_schedule="step", warmup_steps=10,
                             step_boundaries=(50, 80), step_factor=0.1)
        for step, lr in {5: 0.5, 10: 1.0, 49: 1.0, 51: 0.1, 79: 0.1, 81: 0.01}.items():
            self.assertAlmostEqual(_lr(schedule, step), lr, places=6, msg=f"step {step}")

    @parameterized.named_parameters(("none", "none", 0.1), ("linear", "linear", 0.4))
    def test_constant_with_scaling(self, scaling, lr):
        self.assertEqual(_schedule(learning_rate=0.1, lr_scaling=scaling, global_batch_size=1024,
                                   total_steps=None), lr)  # the rate itself, no schedule
        schedule = _schedule(learning_rate=0.1, lr_scaling=scaling, global_batch_size=1024,
                             warmup_steps=4)
        for step, expected in ((0, 0.0), (2, lr / 2), (4, lr), (99, lr)):
            self.assertAlmostEqual(_lr(schedule, step), expected, places=6)
        restored = optimizer_config.WarmUp.from_config(schedule.get_config())
        self.assertAlmostEqual(_lr(restored, 2), lr / 2, places=6)

    def test_schedule_is_not_advanced_on_skipped_steps(self):
        config = OptimizerConfig(optimizer="sgd", learning_rate=1.0, momentum=0.0,
                                 lr_schedule="cosine", warmup_steps=4)
        opt = optimizer_config.make_optimizer(config, policy="mixed_bfloat16", total_steps=20,
                                              global_batch_size=8)
        v = keras.Variable(np.zeros(2, "float32"))
        opt.apply([ops.ones(2)], [v])  # step 0: rate 0
        for _ in range(3):
            opt.apply([ops.convert_to_tensor(np.array([np.nan, 1.0], "float32"))], [v])
        opt.apply([ops.ones(2)], [v])  # step 1 of the warm-up, not step 4: rate 0.25
        self.assertAllClose(v, [-0.25, -0.25])
        self.assertEqual(opt.stats()["skipped_steps"], 3)

    def test_warmup_round_trips_in_a_keras_file(self):
        config = OptimizerConfig(optimizer="adamw", weight_decay=0.01, lr_schedule="cosine",
                                 warmup_steps=3)
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer_config.make_optimizer(
            config, policy="mixed_float16", total_steps=30, global_batch_size=4), "mse")
        model.fit(np.ones((8, 2)), np.ones((8, 1)), batch_size=4, epochs=1, verbose=0)
        path = os.path.join(self.tmp_dir(), "m.keras")
        model.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
        inner = loaded.optimizer.inner_optimizer
        self.assertIsInstance(inner._learning_rate, optimizer_config.WarmUp)
        self.assertEqual(int(ops.convert_to_numpy(inner.iterations)), 2)
        self.assertAllClose(inner.learning_rate, model.optimizer.inner_optimizer.learning_rate)
        restored = optimizer_config.WarmUp.from_config(inner._learning_rate.get_config())
        self.assertAlmostEqual(_lr(restored, 1), _lr(inner._learning_rate, 1), places=7)


def _model():
    inputs = keras.Input((3,))
    x = keras.layers.Dense(3, name="dense")(inputs)
    x = keras.layers.LayerNormalization(name="ln")(x)
    x = tfmp.layers.RMSNormalization(name="rms")(x)
    return keras.Model(inputs, x)


class OptimizerTest(TestCase):

    @parameterized.named_parameters(("sgd", "sgd"), ("adamw", "adamw"), ("lamb", "lamb"),
                                    ("adam", "adam"))
    def test_weight_decay_leaves_out_biases_and_norm_scales(self, name):
        model = _model()
        for v in model.trainable_variables:
            v.assign(ops.ones(v.shape))
        before = {v.path: ops.convert_to_numpy(v).copy() for v in model.trainable_variables}
        config = OptimizerConfig(optimizer=name, learning_rate=0.5, weight_decay=0.1,
                                 momentum=0.0)
        opt = optimizer_config.make_optimizer(config, policy="float32", total_steps=10,
                                              global_batch_size=4)
        opt.apply([ops.zeros(v.shape) for v in model.trainable_variables],
                  model.trainable_variables)
        decayed = {v.path for v in model.trainable_variables
                   if not np.array_equal(ops.convert_to_numpy(v), before[v.path])}
        self.assertEqual(decayed, {"dense/kernel"})
        kernel = ops.convert_to_numpy(model.get_layer("dense").kernel)
        if name != "lamb":  # Lamb rescales the update by the trust ratio.
            self.assertAllClose(kernel, np.full((3, 3), 1 - 0.5 * 0.1), rtol=1e-5)

    @parameterized.named_parameters(("sgd", "sgd", keras.optimizers.SGD),
                                    ("adam", "adam", keras.optimizers.Adam),
                                    ("adamw", "adamw", keras.optimizers.AdamW),
                                    ("lamb", "lamb", keras.optimizers.Lamb))
    def test_classes_and_wrapping(self, name, cls):
        config = OptimizerConfig(optimizer=name, momentum=0.875, nesterov=True, clipnorm=1.0)
        for policy, scaling in (("mixed_float16", True), ("mixed_bfloat16", False),
                                ("float32", False)):
            opt = optimizer_config.make_optimizer(config, policy=policy, total_steps=10,
                                                  global_batch_size=4)
            self.assertIsInstance(opt, tfmp.LossScaleOptimizer)
            self.assertIsInstance(opt.inner_optimizer, cls)
            self.assertEqual((opt.enabled, opt.skip_nonfinite), (scaling, True))
            self.assertEqual(opt.inner_optimizer.clipnorm, 1.0)
        if name == "sgd":
            self.assertEqual((opt.inner_optimizer.momentum, opt.inner_optimizer.nesterov),
                             (0.875, True))

    def test_fixed_loss_scale(self):
        opt = optimizer_config.make_optimizer(OptimizerConfig(), policy="mixed_float16",
                                              total_steps=10, global_batch_size=4,
                                              loss_scale=128.0)
        self.assertEqual((opt.dynamic, float(ops.convert_to_numpy(opt.loss_scale))),
                         (False, 128.0))

    def test_accumulation_equals_the_larger_batch(self):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(8, 3)).astype("float32")
        y = rng.normal(size=(8, 1)).astype("float32")

        def train(grad_accum_steps, batch_size):
            keras.utils.set_random_seed(1)
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
            config = OptimizerConfig(optimizer="sgd", learning_rate=0.1, momentum=0.0,
                                     grad_accum_steps=grad_accum_steps)
            model.compile(optimizer_config.make_optimizer(
                config, policy="float32", total_steps=10, global_batch_size=8), "mse")
            model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
            return model.get_weights()

        for accumulated, whole in zip(train(2, 4), train(1, 8), strict=True):
            self.assertAllClose(accumulated, whole, rtol=1e-5, atol=1e-6)


class ValidationTest(TestCase):

    @parameterized.named_parameters(
        ("optimizer", dict(optimizer="rmsprop"), r"`optimizer` must be one of sgd, adam, "
         r"adamw, lamb\. Received: optimizer='rmsprop'"),
        ("schedule", dict(lr_schedule="linear"), r"`lr_schedule` must be one of.*'linear'"),
        ("scaling", dict(lr_scaling="sqrt"), r"`lr_scaling` must be one of none, linear"),
        ("learning_rate", dict(learning_rate=0.0), r"`learning_rate` must be a positive"),
        ("momentum", dict(momentum=1.0), r"`momentum` must be a number in \[0, 1\)"),
        ("weight_decay", dict(weight_decay=-1e-4), r"`weight_decay` must be a finite number"),
        ("clipnorm", dict(clipnorm=0), r"`clipnorm` must be a positive finite number or None"),
        ("accumulation", dict(grad_accum_steps=0), r"`grad_accum_steps` must be an integer >= 1"),
        ("warmup", dict(warmup_steps=1.5), r"`warmup_steps` must be an integer >= 0"),
        ("nesterov", dict(nesterov="yes"), r"`nesterov` must be True or False"),
        ("boundaries", dict(step_boundaries=(50, 10)), r"`step_boundaries` must be a tuple of "
         r"increasing positive integers"),
        ("step_without_boundaries", dict(lr_schedule="step"), r"needs `step_boundaries`"),
        ("factor", dict(step_factor=1.0), r"`step_factor` must be a number in \(0, 1\)"),
    )
    def test_bad_settings(self, kwargs, message):
        with self.assertRaisesRegex(ValueError, message):
            OptimizerConfig(**kwargs)

    def test_warmup_longer_than_the_run(self):
        with self.assertRaisesRegex(ValueError, r"`warmup_steps` \(10\) must be below the run's "
                                                r"optimizer steps\. Received: total_steps=10"):
            _schedule(total_steps=10, warmup_steps=10)

    def test_boundary_past_the_run(self):
        with self.assertRaisesRegex(ValueError, r"`step_boundaries` must be below the run's 100"):
            _schedule(lr_schedule="step", step_boundaries=(100,))

    def test_config_is_frozen(self):
        with self.assertRaises(AttributeError):
            OptimizerConfig().learning_rate = 1.0
