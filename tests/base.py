"""Shared test base: every test starts and ends with a float32 global policy."""

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import keras
import numpy as np
from absl.testing import parameterized

BACKEND = keras.backend.backend()
HAS_TENSORFLOW = importlib.util.find_spec("tensorflow") is not None
# The test files of the core import `tf` from here: None where TensorFlow is not installed.
tf = importlib.import_module("tensorflow") if BACKEND == "tensorflow" else None

# Tests of TensorFlow-only behaviour (tf.function, tf.distribute, tf.data,
# SavedModel, GradientTape loops): skipped on the other Keras backends, where
# the CI's second run (`.ci/run`, no TensorFlow installed) runs the core tests.
requires_tensorflow = unittest.skipUnless(
    BACKEND == "tensorflow", f"TensorFlow backend only (KERAS_BACKEND={BACKEND})")
# Tests that need TensorFlow installed but not as the backend (e.g. a subprocess under it).
requires_tensorflow_installed = unittest.skipUnless(HAS_TENSORFLOW, "TensorFlow not installed")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The environment of the subprocesses the tests start (quiet TensorFlow, this checkout).
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
_BLOCK_TENSORFLOW = 'import sys; sys.modules["tensorflow"] = None  # as where it is not installed'


def run_python(args, *, backend: str | None = None, without_tensorflow: bool = False,
               timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `python *args` in the repository as a user would, capturing its output.

    Args:
        args: `["-m", module, *flags]` or `["-c", code]`.
        backend: `KERAS_BACKEND` for the subprocess (default: inherited).
        without_tensorflow: Make every `import tensorflow` fail, as on a machine
            without it (the backend is then this process's, or JAX instead of
            TensorFlow, unless `backend` says otherwise).
        timeout: Seconds before the subprocess is killed.
    """
    env = dict(ENV)
    if backend is None and without_tensorflow:
        backend = BACKEND if BACKEND != "tensorflow" else "jax"
    if backend is not None:
        env["KERAS_BACKEND"] = backend
    args = list(args)
    if without_tensorflow and args[0] == "-c":
        args = ["-c", f"{_BLOCK_TENSORFLOW}\n{args[1]}"]
    elif without_tensorflow and args[0] == "-m":
        module, flags = args[1], args[2:]
        args = ["-c", f"{_BLOCK_TENSORFLOW}\nimport runpy; sys.argv = [{module!r}, *{flags!r}]"
                      f"\nrunpy.run_module({module!r}, run_name='__main__', alter_sys=True)"]
    elif without_tensorflow:
        raise ValueError(f"without_tensorflow needs -m or -c. Received: args={args!r}")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def apply_step(opt, grads, variables) -> None:
    """One optimizer step the way the backend's `fit` takes it.

    On JAX, `stateless_apply` on the variables' values, written back (JAX's
    trainer is functional; Keras' own LossScaleOptimizer cannot even `apply`
    eagerly there: its `cond` leaks a tracer). Elsewhere `opt.apply`.
    """
    if BACKEND != "jax":
        opt.apply(grads, variables)
        return
    if not opt.built:
        opt.build(variables)
    new_values, new_state = opt.stateless_apply(
        [v.value for v in opt.variables], list(grads), [v.value for v in variables])
    for ref, value in zip(opt.variables, new_state, strict=True):
        ref.assign(value)
    for ref, value in zip(variables, new_values, strict=True):
        ref.assign(value)


def two_replica_strategy():
    """The process's one MirroredStrategy, over the two logical CPUs of conftest.py.

    TensorFlow's collective ops keep per-process instance keys: a second
    MirroredStrategy in the same process can collide with the first one, so
    tests share tfmp's (cached) strategy.
    """
    import tfmp

    strategy = tfmp.distribute.create_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
    return strategy


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

    def tmp_dir_with_a_file(self, name: str = "afile") -> tuple[str, str]:
        """A fresh temporary directory holding one small file; returns both paths."""
        directory = self.tmp_dir()
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write("x")
        return directory, path

    def assertAllFinite(self, values, msg=None):
        for v in values if isinstance(values, (list, tuple)) else [values]:
            arr = np.asarray(keras.ops.convert_to_numpy(v))
            self.assertTrue(np.all(np.isfinite(arr)), msg or f"non-finite values: {arr}")

    def assertAllClose(self, a, b, rtol=1e-6, atol=1e-6, msg=None):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b),
            rtol=rtol, atol=atol, err_msg=msg or "",
        )
