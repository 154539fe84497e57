"""Shared test base: every test starts and ends with a float32 global policy."""

import shutil
import tempfile

import keras
import numpy as np
from absl.testing import parameterized

_STRATEGY = None


def two_replica_strategy():
    """One MirroredStrategy over the two logical CPUs, shared by all tests.

    TensorFlow's collective ops keep per-process instance keys: a second
    strategy built in the same process can collide with the first one.
    """
    global _STRATEGY
    if _STRATEGY is None:
        import tensorflow as tf

        _STRATEGY = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    return _STRATEGY


class TestCase(parameterized.TestCase):
    """A test case that resets Keras' global state around each test."""

    def setUp(self):
        super().setUp()
        keras.backend.clear_session()
        keras.config.set_dtype_policy("float32")
        keras.utils.set_random_seed(0)

    def tearDown(self):
        keras.config.set_dtype_policy("float32")
        keras.backend.clear_session()
        super().tearDown()

    def tmp_dir(self) -> str:
        """A fresh temporary directory, removed after the test."""
        path = tempfile.mkdtemp(prefix="tfmp-test-")
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        return path

    def assertAllFinite(self, values, msg=None):
        for v in values if isinstance(values, (list, tuple)) else [values]:
            arr = np.asarray(keras.ops.convert_to_numpy(v))
            self.assertTrue(np.all(np.isfinite(arr)), msg or f"non-finite values: {arr}")

    def assertAllClose(self, a, b, rtol=1e-6, atol=1e-6, msg=None):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b),
            rtol=rtol, atol=atol, err_msg=msg or "",
        )
