"""Tests for tfmp/export.py and tools/export_savedmodel.py."""

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tfmp
from tests.base import TestCase
from tfmp import _io, export

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TensorFlow's C++ start-up lines ("I0000 ... port.cc ...", "E0000 ... cuInit ...")
# reach stderr whatever TF_CPP_MIN_LOG_LEVEL says; they are not the tool's output.
_TF_LOG_LINE = re.compile(r"^([IWEF]\d{4} |WARNING: All log messages before absl::InitializeLog)")
# Half a float16 ulp at 1 is 2**-11; the exported graph may fuse differently.
_F16_TOL = dict(rtol=2e-3, atol=2e-3)


def _dense_model():
    """Two Dense layers built under mixed_float16: the last layer outputs float16."""
    with tfmp.policy_scope("mixed_float16"):
        return keras.Sequential(
            [keras.Input((4,), name="x"), keras.layers.Dense(8, activation="relu"),
             keras.layers.Dense(3)]
        )


def _two_in_two_out(dict_inputs=True):
    """A mixed_float16 functional model with inputs `a`, `b` and outputs `score`, `probs`."""
    with tfmp.policy_scope("mixed_float16"):
        a = keras.Input((3,), name="a")
        b = keras.Input((2,), name="b")
        h = keras.layers.Dense(4, activation="relu")(keras.layers.Concatenate()([a, b]))
        score = keras.layers.Dense(1, name="score")(h)
        probs = keras.layers.Dense(2, activation="softmax", name="probs")(h)
        if dict_inputs:
            return keras.Model({"a": a, "b": b}, [score, probs])
        return keras.Model([a, b], {"score": score, "probs": probs})


def _two_in_inputs(n=5):
    rng = np.random.default_rng(0)
    return {"a": rng.normal(size=(n, 3)).astype("float32"),
            "b": rng.normal(size=(n, 2)).astype("float32")}


def _run(args, **kwargs):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, *args], cwd=_REPO, env=env, capture_output=True, text=True,
        timeout=120, **kwargs,
    )


def _own_stderr_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip() and not _TF_LOG_LINE.match(line)]


class ExportTest(TestCase):

    def _tmp(self):
        path = tempfile.mkdtemp(prefix="tfmp-export-test-")
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        return path

    # ---------------------------------------------------------- dtypes, values
    def test_stock_export_serves_float16_tfmp_serves_float32(self):
        model = _dense_model()
        x = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")
        expected = keras.ops.convert_to_numpy(model(x)).astype("float32")
        stock_dir = os.path.join(self._tmp(), "stock")
        model.export(stock_dir, verbose=False)
        stock_reloaded = tf.saved_model.load(stock_dir)
        stock = stock_reloaded.signatures["serving_default"](x=x)["output_0"]
        self.assertEqual(stock.dtype, tf.float16)  # Keras' own export: float16 out.

        path = export.export_saved_model(model, os.path.join(self._tmp(), "tfmp"))
        reloaded = tf.saved_model.load(path)
        ours = reloaded.signatures["serving_default"](x=x)["output_0"]
        self.assertEqual(ours.dtype, tf.float32)
        self.assertAllClose(ours, expected, **_F16_TOL)

    @parameterized.named_parameters(
        ("float32", "float32", 2e-3), ("float16", "float16", 2e-3), ("bfloat16", "bfloat16", 3e-2)
    )
    def test_serving_dtype_sets_signature_dtypes(self, serving_dtype, tol):
        model = _dense_model()
        path = export.export_saved_model(
            model, os.path.join(self._tmp(), "m"), serving_dtype=serving_dtype
        )
        self.assertEqual(
            export.serving_signature(path),
            {"inputs": {"x": (serving_dtype, (None, 4))},
             "outputs": {"output_0": (serving_dtype, (None, 3))}},
        )
        x = np.random.default_rng(1).normal(size=(3, 4)).astype("float32")
        reloaded = tf.saved_model.load(path)
        out = reloaded.serve(tf.cast(x, serving_dtype))
        self.assertEqual(out.dtype.name, serving_dtype)
        self.assertAllClose(tf.cast(out, "float32"), keras.ops.cast(model(x), "float32"),
                            rtol=tol, atol=tol)

    @parameterized.named_parameters(("dict_in_list_out", True), ("list_in_dict_out", False))
    def test_two_inputs_two_outputs_keep_their_names(self, dict_inputs):
        model = _two_in_two_out(dict_inputs)
        path = export.export_saved_model(model, os.path.join(self._tmp(), "m"))
        self.assertEqual(
            export.serving_signature(path),
            {"inputs": {"a": ("float32", (None, 3)), "b": ("float32", (None, 2))},
             "outputs": {"probs": ("float32", (None, 2)), "score": ("float32", (None, 1))}},
        )
        x = _two_in_inputs()
        expected = model(x if dict_inputs else [x["a"], x["b"]])
        if not dict_inputs:
            expected = [expected["score"], expected["probs"]]
        reloaded = tf.saved_model.load(path)
        out = reloaded.signatures["serving_default"](**x)
        for name, want in zip(("score", "probs"), expected, strict=True):
            self.assertEqual(out[name].dtype, tf.float32)
            self.assertAllClose(out[name], keras.ops.cast(want, "float32"), **_F16_TOL)

    def test_integer_inputs_keep_their_dtype(self):
        with tfmp.policy_scope("mixed_float16"):
            ids = keras.Input((5,), dtype="int32", name="ids")
            h = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(10, 4)(ids))
            model = keras.Model(ids, keras.layers.Dense(2)(h))
        path = export.export_saved_model(model, os.path.join(self._tmp(), "m"))
        self.assertEqual(export.serving_signature(path)["inputs"], {"ids": ("int32", (None, 5))})
        x = np.arange(10, dtype="int32").reshape(2, 5)
        reloaded = tf.saved_model.load(path)
        out = reloaded.serve(x)
        self.assertEqual(out.dtype, tf.float32)
        self.assertAllClose(out, keras.ops.cast(model(x), "float32"), **_F16_TOL)

    def test_loss_scale_optimizer_state_is_not_exported(self):
        model = _dense_model()
        model.compile(optimizer=tfmp.LossScaleOptimizer(keras.optimizers.Adam(1e-2)), loss="mse")
        rng = np.random.default_rng(2)
        x, y = rng.normal(size=(16, 4)).astype("float32"), rng.normal(size=(16, 3))
        model.fit(x, y.astype("float32"), batch_size=8, epochs=1, verbose=0)
        self.assertGreater(len(model.optimizer.variables), 0)
        self.assertAllFinite(model.weights)

        path = export.export_saved_model(model, os.path.join(self._tmp(), "m"))
        reloaded = tf.saved_model.load(path)
        self.assertEqual(len(reloaded.variables), len(model.variables))
        self.assertAllClose(reloaded.serve(x), keras.ops.cast(model(x), "float32"), **_F16_TOL)

    def test_loads_in_a_fresh_process_with_tensorflow_alone(self):
        model = _two_in_two_out()
        tmp = self._tmp()
        path = export.export_saved_model(model, os.path.join(tmp, "m"),
                                         weights_dtype="float16")  # float32's: the same code
        x = _two_in_inputs()
        np.savez(os.path.join(tmp, "in.npz"), **x)
        snippet = textwrap.dedent("""
            import sys
            import numpy as np
            import tensorflow as tf
            path, tmp = sys.argv[1:]
            reloaded = tf.saved_model.load(path)
            served = reloaded.signatures["serving_default"]
            x = np.load(tmp + "/in.npz")
            out = served(**{k: tf.constant(x[k]) for k in x.files})
            np.savez(tmp + "/out.npz", **{k: v.numpy() for k, v in out.items()})
            assert "tfmp" not in sys.modules
        """)
        proc = _run(["-c", snippet, path, tmp])
        self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
        out = np.load(os.path.join(tmp, "out.npz"))
        self.assertEqual(sorted(out.files), ["probs", "score"])
        for name, want in zip(("score", "probs"), model(x), strict=True):
            self.assertEqual(out[name].dtype, np.float32)
            self.assertAllClose(out[name], keras.ops.cast(want, "float32"), **_F16_TOL)

    # --------------------------------------------------------- float16 weights
    def _stored_dtypes(self, path):
        reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
        return {name: dtype.name for name, dtype in reader.get_variable_to_dtype_map().items()
                if dtype != tf.string}  # not the object graph

    def _variables_bytes(self, path):
        directory = os.path.join(path, "variables")
        return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))

    def _bn_model(self, policy):
        with tfmp.policy_scope(policy):
            model = keras.Sequential([
                keras.Input((64,), name="x"), keras.layers.Dense(256, activation="relu"),
                keras.layers.BatchNormalization(), keras.layers.LayerNormalization(),
                tfmp.layers.OutputHead(3)])
        model.layers[1].moving_variance.assign(np.full(256, 1e-9, "float32"))  # < float16's
        return model

    @parameterized.named_parameters(("mixed_float16", "mixed_float16"), ("float32", "float32"))
    def test_float16_weights_halve_the_variables_and_serve_float32(self, policy):
        model = self._bn_model(policy)
        x = np.random.default_rng(0).normal(size=(8, 64)).astype("float32")
        full = export.export_saved_model(model, os.path.join(self._tmp(), "f32"))
        half = export.export_saved_model(model, os.path.join(self._tmp(), "f16"),
                                         weights_dtype="float16")
        self.assertLess(self._variables_bytes(half), 0.6 * self._variables_bytes(full))
        # Only the stored copies are saved (not the model's float32 variables too):
        # trainable ones in float16, the non-trainable batch-norm statistics in float32
        # (a variance of 1e-9 is 0 in float16).
        dtypes = sorted(self._stored_dtypes(half).values())
        self.assertEqual(dtypes, ["float16"] * len(model.trainable_variables)
                         + ["float32"] * len(model.non_trainable_variables))
        self.assertEqual(export.serving_signature(half), export.serving_signature(full))
        served = {name: tf.saved_model.load(path).signatures["serving_default"](
            x=tf.constant(x))["output_0"].numpy() for name, path in (("full", full),
                                                                      ("half", half))}
        self.assertEqual(served["half"].dtype, np.float32)
        difference = np.abs(served["half"] - served["full"]).max()
        if policy == "mixed_float16":  # every layer already reads its weights as float16
            self.assertEqual(difference, 0.0)
        else:  # float32 layers now read float16-rounded weights
            self.assertGreater(difference, 0.0)
            self.assertLess(difference, 2e-3)

    def test_bad_weights_dtype(self):
        with self.assertRaisesRegex(ValueError, r"^Unknown `weights_dtype`: 'int8'. Expected "
                                    r"one of: float32, float16.$"):
            export.export_saved_model(_dense_model(), os.path.join(self._tmp(), "m"),
                                      weights_dtype="int8")

    # ------------------------------------------------------------- TFSMLayer
    def test_stock_tfsm_layer_fails_under_mixed_policy_load_serving_layer_works(self):
        model = _dense_model()
        path = export.export_saved_model(model, os.path.join(self._tmp(), "m"))
        x = np.random.default_rng(3).normal(size=(2, 4)).astype("float32")
        keras.config.set_dtype_policy("mixed_float16")
        stock = keras.layers.TFSMLayer(path, call_endpoint="serving_default")
        # Keras casts the float32 input to float16 before calling the SavedModel.
        with self.assertRaisesRegex(Exception, r"dtype=tf\.float16.*dtype=tf\.float32"):
            stock(x)

        layer = export.load_serving_layer(path)
        self.assertEqual(layer.dtype, "float32")
        out = layer(x)
        self.assertEqual(keras.backend.standardize_dtype(out.dtype), "float32")
        self.assertAllClose(out, keras.ops.cast(model(x), "float32"), **_F16_TOL)
        # It also works as a layer of a new model built under the mixed policy.
        wrapper = keras.Sequential([keras.Input((4,)), layer])
        self.assertAllClose(wrapper.predict(x, verbose=0), out)

    def test_load_serving_layer_takes_the_input_structure(self):
        model = _two_in_two_out()
        path = export.export_saved_model(model, os.path.join(self._tmp(), "m"))
        keras.config.set_dtype_policy("mixed_float16")
        out = export.load_serving_layer(path)(_two_in_inputs())
        for name, want in zip(("score", "probs"), model(_two_in_inputs()), strict=True):
            self.assertEqual(keras.backend.standardize_dtype(out[name].dtype), "float32")
            self.assertAllClose(out[name], keras.ops.cast(want, "float32"), **_F16_TOL)

    # --------------------------------------------------------- atomic writes
    def _failing_save(self):
        """An `ExportArchive.write_out` that writes part of the SavedModel, then fails.

        (Patched on the backend's archive class that `keras.export.ExportArchive()`
        returns: `tf.saved_model` is a lazily loaded module, and patching its
        `save` does not reach Keras in every test order.)
        """
        def write_out(archive, export_dir, *args, **kwargs):
            os.makedirs(export_dir, exist_ok=True)
            with open(os.path.join(export_dir, "saved_model.pb"), "wb") as f:
                f.write(b"half written")
            raise OSError("disk full (simulated)")
        return mock.patch.object(type(keras.export.ExportArchive()), "write_out", write_out)

    def test_failed_first_export_leaves_nothing(self):
        parent = self._tmp()
        target = os.path.join(parent, "m")
        with self._failing_save(), self.assertRaisesRegex(OSError, "simulated"):
            export.export_saved_model(_dense_model(), target)
        self.assertEqual(os.listdir(parent), [])

    def test_failed_export_keeps_the_previous_one(self):
        parent = self._tmp()
        target = os.path.join(parent, "m")
        old_model = _dense_model()
        export.export_saved_model(old_model, target)
        before = sorted(os.listdir(target))
        with self._failing_save(), self.assertRaisesRegex(OSError, "simulated"):
            export.export_saved_model(_dense_model(), target)
        self.assertEqual(os.listdir(parent), ["m"])
        self.assertEqual(sorted(os.listdir(target)), before)
        x = np.ones((1, 4), "float32")
        reloaded = tf.saved_model.load(target)
        self.assertAllClose(reloaded.serve(x),
                            keras.ops.cast(old_model(x), "float32"), **_F16_TOL)

    def test_export_replaces_a_previous_export(self):
        parent = self._tmp()
        target = os.path.join(parent, "m")
        export.export_saved_model(_dense_model(), target)
        new_model = _dense_model()
        self.assertEqual(export.export_saved_model(new_model, target), target)
        self.assertEqual(os.listdir(parent), ["m"])
        # Same permissions as a directory made the usual way (not mkdtemp's 0700).
        os.mkdir(os.path.join(parent, "probe"))
        self.assertEqual(stat.S_IMODE(os.stat(target).st_mode),
                         stat.S_IMODE(os.stat(os.path.join(parent, "probe")).st_mode))
        x = np.ones((1, 4), "float32")
        reloaded = tf.saved_model.load(target)
        self.assertAllClose(reloaded.serve(x),
                            keras.ops.cast(new_model(x), "float32"), **_F16_TOL)

    def test_refuses_to_replace_what_is_not_a_saved_model(self):
        parent = self._tmp()
        busy = os.path.join(parent, "busy")
        os.makedirs(busy)
        with open(os.path.join(busy, "notes.txt"), "w") as f:
            f.write("keep me")
        with self.assertRaisesRegex(
            ValueError, r"`export_dir` is a non-empty directory that holds no SavedModel.*busy"
        ):
            export.export_saved_model(_dense_model(), busy)
        with self.assertRaisesRegex(ValueError, "`export_dir` exists and is not a directory"):
            export.export_saved_model(_dense_model(), os.path.join(busy, "notes.txt"))
        self.assertEqual(sorted(os.listdir(parent)), ["busy"])
        self.assertEqual(os.listdir(busy), ["notes.txt"])

    @parameterized.named_parameters(
        ("users_file", "notes.txt", False, r"\['notes\.txt'\]"),
        ("users_directory", "assets.extra", True, r"\['assets\.extra'\]"),
        ("file_in_variables", "variables/mine.txt", False, r"\['variables/mine\.txt'\]"),
    )
    def test_refuses_to_replace_a_saved_model_holding_other_files(self, extra, is_dir, listed):
        parent = self._tmp()
        target = os.path.join(parent, "m")
        export.export_saved_model(_dense_model(), target)
        path = os.path.join(target, extra)
        if is_dir:
            os.mkdir(path)
        else:
            with open(path, "w") as f:
                f.write("keep me")
        before = sorted(os.listdir(target))
        message = (r"`export_dir` holds a SavedModel and entries that are not part of one: "
                   + listed + r"; refusing to replace it.*Received: export_dir='.*/m'")
        with self.assertRaisesRegex(ValueError, message):
            export.check_export_dir(target)  # what recipes call before training
        with self.assertRaisesRegex(ValueError, message):
            export.export_saved_model(_dense_model(), target)
        self.assertTrue(os.path.exists(path))
        self.assertEqual(sorted(os.listdir(target)), before)
        self.assertEqual(os.listdir(parent), ["m"])

    def test_next_export_removes_what_a_killed_export_left(self):
        parent = self._tmp()
        target = os.path.join(parent, "m")
        snippet = textwrap.dedent("""
            import os, signal, sys
            import keras
            import tfmp
            def write_out(archive, export_dir, *args, **kwargs):
                os.makedirs(os.path.join(export_dir, "variables"))
                with open(os.path.join(export_dir, "saved_model.pb"), "wb") as f:
                    f.write(b"half written")
                os.kill(os.getpid(), signal.SIGKILL)
            type(keras.export.ExportArchive()).write_out = write_out
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
            tfmp.export.export_saved_model(model, sys.argv[1])
        """)
        proc = _run(["-c", snippet, target])
        self.assertEqual(proc.returncode, -9, proc.stderr[-2000:])
        leftovers = os.listdir(parent)
        self.assertLen(leftovers, 1)
        self.assertTrue(leftovers[0].startswith("."), leftovers)  # hidden, not `m`
        # A live export's temporary directory is left alone.
        live = _io._sibling(target, "tmp", pid=os.getppid())
        os.mkdir(live)
        export.export_saved_model(_dense_model(), target)
        self.assertEqual(sorted(os.listdir(parent)), sorted(["m", os.path.basename(live)]))
        self.assertIn("saved_model.pb", os.listdir(target))

    # ------------------------------------------------------------ bad input
    @parameterized.named_parameters(
        ("int8", "int8"), ("float64", "float64"), ("policy_name", "mixed_float16")
    )
    def test_bad_serving_dtype(self, serving_dtype):
        with self.assertRaisesRegex(
            ValueError,
            r"`serving_dtype` must be one of: float32, float16, bfloat16\. "
            rf"Received: serving_dtype='{serving_dtype}'",
        ):
            export.export_saved_model(
                _dense_model(), os.path.join(self._tmp(), "m"), serving_dtype=serving_dtype
            )

    def test_refuses_remote_paths(self):
        cwd = os.getcwd()
        os.chdir(self._tmp())
        self.addCleanup(os.chdir, cwd)
        with self.assertRaisesRegex(ValueError, "`export_dir` must be a local path.*"
                                    "Received: export_dir='gs://bucket/serving/1'"):
            export.export_saved_model(_dense_model(), "gs://bucket/serving/1")
        self.assertEqual(os.listdir("."), [])  # no local ./gs:/ directory either

    def test_bad_model(self):
        with self.assertRaisesRegex(ValueError, r"`model` must be a `keras.Model`.*Dense"):
            export.export_saved_model(keras.layers.Dense(2), os.path.join(self._tmp(), "m"))
        with self.assertRaisesRegex(ValueError, r"`model` has no defined inputs.*'unbuilt'"):
            export.export_saved_model(
                keras.Sequential([keras.layers.Dense(2)], name="unbuilt"),
                os.path.join(self._tmp(), "m"),
            )

    # -------------------------------------------------------------------- CLI
    def test_cli_exports_and_prints_the_signature(self):
        tmp = self._tmp()
        model_path = os.path.join(tmp, "model.keras")
        _two_in_two_out().save(model_path)
        target = os.path.join(tmp, "served")
        proc = _run(["-m", "tools.export_savedmodel", f"--model={model_path}",
                     f"--export_dir={target}", "--serving_dtype=float32",
                     "--weights_dtype=float16"])
        self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
        self.assertIn(f"SavedModel written to {target}", proc.stdout)
        self.assertIn("inputs: a: float32[None, 3], b: float32[None, 2]", proc.stdout)
        self.assertIn("outputs: probs: float32[None, 2], score: float32[None, 1]", proc.stdout)
        self.assertEqual(export.serving_signature(target)["outputs"]["score"],
                         ("float32", (None, 1)))

    def test_cli_refuses_the_export_dir_before_loading_the_model(self):
        tmp = self._tmp()
        target = os.path.join(tmp, "m")
        os.makedirs(os.path.join(target, "variables"))
        for name in ("saved_model.pb", "notes.txt"):
            with open(os.path.join(target, name), "w") as f:
                f.write("keep me")
        proc = _run(["-m", "tools.export_savedmodel", f"--model={tmp}/missing.keras",
                     f"--export_dir={target}"])
        self.assertEqual(proc.returncode, 2)
        lines = _own_stderr_lines(proc.stderr)
        self.assertLen(lines, 1, proc.stderr)
        self.assertRegex(lines[0], r"^error: `export_dir` holds a SavedModel and entries that "
                         r"are not part of one: \['notes\.txt'\]")
        self.assertEqual(sorted(os.listdir(target)), ["notes.txt", "saved_model.pb", "variables"])

    def test_cli_without_model_flag(self):
        proc = _run(["-m", "tools.export_savedmodel", "--export_dir=/nonexistent/out"])
        self.assertEqual(proc.returncode, 2)
        self.assertEqual(_own_stderr_lines(proc.stderr),
                         ["error: `--model` is required: the path of a `.keras` file."])

    @parameterized.named_parameters(
        ("missing_file", "missing", r"`--model` is not a file"),
        ("not_a_keras_file", "garbage", r"`--model` is not a `.keras` zip archive"),
        ("lambda_layer_refused_in_safe_mode", "lambda",
         r"could not load `--model` as a Keras model.*safe_mode"),
    )
    def test_cli_bad_input_is_one_line_on_stderr(self, which, message):
        # A bad --serving_dtype takes the same `main` error path (its message is
        # pinned by test_bad_serving_dtype). Each case that imports TensorFlow costs
        # seconds, so only the safe_mode one gets that far.
        tmp = self._tmp()
        model_path = os.path.join(tmp, f"{which}.keras")
        if which == "garbage":
            with open(model_path, "wb") as f:
                f.write(b"this is not a zip file")
        elif which == "lambda":
            keras.Sequential(
                [keras.Input((2,)), keras.layers.Lambda(lambda t: t * 2.0)]
            ).save(model_path)
        proc = _run(["-m", "tools.export_savedmodel", f"--model={model_path}",
                     f"--export_dir={os.path.join(tmp, 'out')}"])
        self.assertEqual(proc.returncode, 2)  # a usage error (tfmp.cli)
        self.assertNotIn("Traceback", proc.stderr)
        lines = _own_stderr_lines(proc.stderr)
        self.assertLen(lines, 1, proc.stderr)
        self.assertRegex(lines[0], "^error: " + message)
        self.assertFalse(os.path.exists(os.path.join(tmp, "out")))
