"""The backend-agnostic core (optimizer, layers, losses) on Keras' JAX backend.

Keras fixes its backend at import, so the checks run in a subprocess with
KERAS_BACKEND=jax. Keras' own LossScaleOptimizer suite is also run there: on JAX
it exercises `stateless_apply`, which TensorFlow never uses.
"""

import importlib.util
import os
import unittest

from tests.base import TestCase, run_python

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = r'''
import numpy as np
import keras
from keras import ops
assert keras.backend.backend() == "jax"
import tfmp

# fit under mixed_float16 with tfmp's layers, loss and optimizer; one batch holds a NaN.
tfmp.set_global_policy("mixed_float16")
rng = np.random.default_rng(0)
x = rng.normal(size=(32, 8)).astype("float32")
y = (x[:, 0] > 0).astype("int32")
x[0, 0] = np.nan
inputs = keras.Input((8,))
h = tfmp.layers.LayerNormalization()(keras.layers.Dense(16, activation="relu")(inputs))
model = keras.Model(inputs, tfmp.layers.OutputHead(2)(h))
opt = tfmp.LossScaleOptimizer(keras.optimizers.Adam(1e-2), initial_scale=64.0,
                              dynamic_growth_steps=2, max_scale=128.0)
model.compile(optimizer=opt, loss=tfmp.losses.SparseCategoricalCrossentropy())
model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
assert model.outputs[0].dtype == "float32"
assert all(np.isfinite(w).all() for w in model.get_weights()), "non-finite weight"
skipped = int(ops.convert_to_numpy(opt.skipped_steps))
scale = float(ops.convert_to_numpy(opt.loss_scale))
assert skipped == 2, skipped  # the NaN batch, once per epoch
assert int(ops.convert_to_numpy(opt.iterations)) == 6
assert scale == 64.0, scale  # each epoch: NaN batch 64 -> 32, two clean steps -> 64
print("fit ok", skipped, scale)

# stateless bounds: finite gradients forever stop at max_scale, NaN ones at min_scale.
v = keras.Variable(np.ones(2, "float32"))
opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=4.0,
                              dynamic_growth_steps=1, max_scale=16.0, min_scale=2.0)
opt.build([v])
state = [w.value for w in opt.variables]
for grad in [np.ones(2)] * 6 + [np.array([np.nan, 1.0])] * 6:
    (new_v,), state = opt.stateless_apply(state, [ops.array(grad, "float32")], [v.value])
    v.assign(new_v)
for ref, value in zip(opt.variables, state):
    ref.assign(value)
assert float(ops.convert_to_numpy(opt.loss_scale)) == 2.0
assert int(ops.convert_to_numpy(opt.skipped_steps)) == 6
assert np.isfinite(ops.convert_to_numpy(v)).all()
print("stateless ok")

# 16-bit gradients are unscaled in float32 (2**16 is inf in float16).
keras.config.set_dtype_policy("float16")
v16 = keras.Variable(np.ones(2, "float32"), dtype="float16")
opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(1.0), initial_scale=2.0**16)
opt.apply([ops.array([655.36, 655.36], "float16")], [v16])
assert abs(float(ops.convert_to_numpy(v16)[0]) - 0.99) < 2e-3, ops.convert_to_numpy(v16)
keras.config.set_dtype_policy("float32")

# Stateless: finite gradients whose squares overflow are skipped, Adam's slots stay finite;
# without scaling (enabled=False) a NaN gradient is still skipped.
for enabled, grad in ((True, [1e20, 1e20]), (False, [np.nan, 1.0])):
    v = keras.Variable(np.ones(2, "float32"))
    opt = tfmp.LossScaleOptimizer(keras.optimizers.Adam(0.1), initial_scale=1.0,
                                  enabled=enabled)
    opt.build([v])
    state = [w.value for w in opt.variables]
    (new_v,), state = opt.stateless_apply(state, [ops.array(grad, "float32")], [v.value])
    for ref, value in zip(opt.variables, state):
        ref.assign(value)
    assert np.array_equal(ops.convert_to_numpy(new_v), [1.0, 1.0]), new_v
    assert all(np.isfinite(ops.convert_to_numpy(w)).all() for w in opt.variables)
    assert opt.stats()["skipped_steps"] == 1, opt.stats()
print("safety ok")
'''


@unittest.skipIf(importlib.util.find_spec("jax") is None, "jax is not installed")
class JaxBackendTest(TestCase):
    def _run(self, args):
        return run_python(args, backend="jax", timeout=600)

    def test_core_on_jax(self):
        proc = self._run(["-c", SCRIPT])
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        self.assertIn("fit ok 2 64.0", proc.stdout)
        self.assertIn("stateless ok", proc.stdout)
        self.assertIn("safety ok", proc.stdout)

    def test_keras_suite_on_jax(self):
        proc = self._run(["-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/keras_suite_test.py"])
        self.assertEqual(proc.returncode, 0, proc.stdout[-3000:])
        self.assertRegex(proc.stdout, r"\d+ passed")
