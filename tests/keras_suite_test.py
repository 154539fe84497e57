"""Keras' own LossScaleOptimizer test suite, pointed at tfmp's class.

The suite ships inside the keras package. Two of its tests pin what tfmp
changes on purpose; they are replaced by tests of tfmp's behaviour.
"""

from unittest import mock

import keras
from keras.src.optimizers import loss_scale_optimizer_test as keras_suite

import tfmp


class KerasSuiteOnTfmpTest(keras_suite.LossScaleOptimizerTest):
    def setUp(self):
        super().setUp()
        patcher = mock.patch.object(keras_suite, "LossScaleOptimizer", tfmp.LossScaleOptimizer)
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_patch_is_in_force(self):
        opt = keras_suite.LossScaleOptimizer(keras.optimizers.SGD(0.5))
        self.assertIsInstance(opt, tfmp.LossScaleOptimizer)

    def test_serialization(self):
        # Keras pins a 4-key config; tfmp's adds its own arguments.
        opt = tfmp.LossScaleOptimizer(
            keras.optimizers.SGD(0.5), initial_scale=3.0, dynamic_growth_steps=2, name="test_opt")
        config = opt.get_config()
        self.assertEqual(
            set(config),
            {"name", "inner_optimizer", "initial_scale", "dynamic_growth_steps", "dynamic",
             "growth_factor", "backoff_factor", "min_scale", "max_scale", "hysteresis",
             "enabled", "skip_nonfinite"},
        )
        self.assertEqual(tfmp.LossScaleOptimizer.from_config(config).get_config(), config)

    def test_init_dynamic_arg(self):
        # Keras refuses dynamic=False; tfmp keeps a fixed scale.
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.5), dynamic=False)
        self.assertFalse(opt.dynamic)
