"""Tests for tfmp/audit.py (`audit_model`, the report) and the `tools.audit` CLI."""

import fnmatch
import json
import math
import os
import subprocess
import sys
import tempfile
from unittest import mock

import keras
import numpy as np
from absl.testing import parameterized

import tfmp
from tests.base import TestCase, requires_tensorflow, tf
from tfmp import audit, convert

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_X = np.random.default_rng(0).uniform(0.5, 1.5, (8, 4)).astype("float32")


def _dense(units, value, name):
    return keras.layers.Dense(units, kernel_initializer=keras.initializers.Constant(value),
                              name=name)


def _overflow_model():
    """benign (|a| ~2) -> big (|a| ~1e5 > 65504) -> shrink (|a| ~1e3) -> head."""
    return keras.Sequential([
        keras.Input((4,)), _dense(8, 0.5, "benign"), _dense(8, 1e4, "big"),
        _dense(8, 1e-3, "shrink"), keras.layers.Dense(2, name="head")])


def _underflow_model():
    """benign -> tiny (|a| ~1e-8 < 2**-24) -> restore (|a| ~1e-3) -> head."""
    return keras.Sequential([
        keras.Input((4,)), _dense(8, 0.5, "benign"), _dense(8, 1e-9, "tiny"),
        _dense(8, 1e4, "restore"), keras.layers.Dense(2, name="head")])


def _rows(report):
    return {row.name: row for row in report.layers}


def _tiny_mse(y_true, y_pred):
    """A loss 1e-9 times MSE: its float32 gradients are ~1e-10, below float16's 6e-8."""
    y_pred = keras.ops.cast(y_pred, "float32")
    return 1e-9 * keras.ops.mean(keras.ops.square(y_true - y_pred))


def _gradient_model_4():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="h"),
                             keras.layers.Dense(1, name="out")])


def _gradient_model():
    return keras.Sequential([
        keras.Input((16,)), keras.layers.Dense(16, activation="tanh", name="h1"),
        keras.layers.Dense(16, activation="tanh", name="h2"), keras.layers.Dense(1, name="out")])


class AuditModelTest(TestCase):

    def test_overflowing_layer_flagged_benign_not(self):
        report = audit.audit_model(_overflow_model(), _X)
        rows = _rows(report)
        self.assertGreater(rows["big"].max_abs_activation, audit.FLOAT16_MAX)
        self.assertTrue(rows["big"].overflow)
        self.assertTrue(rows["big"].recommend_float32)
        self.assertRegex(rows["big"].reason, r"> float16 max 65504")
        # Its consumer would cast the float32 1e5 back to float16: flagged too.
        self.assertTrue(rows["shrink"].recommend_float32)
        self.assertRegex(rows["shrink"].reason, r"input from 'big' out of float16 range")
        benign = rows["benign"]
        self.assertFalse(benign.overflow or benign.recommend_float32)
        self.assertEqual(benign.reason, "")
        self.assertEqual(benign.underflow_fraction, 0.0)
        self.assertLess(benign.relative_error, 1e-2)
        self.assertEqual(rows["benign"].dtype, "float16")
        self.assertEqual(rows["head"].dtype, "float32")  # apply_policy keeps outputs float32.
        self.assertEqual(math.inf, rows["head"].relative_error)
        self.assertEqual(report.recommended_float32_layers, ["big", "shrink"])

    def test_recommendation_removes_overflow(self):
        model = _overflow_model()
        report = audit.audit_model(model, _X)
        reference = keras.ops.convert_to_numpy(model(_X))
        # Stock conversion (outputs float32, the rest float16) gives inf/NaN.
        stock = convert.apply_policy(model, "mixed_float16")
        self.assertFalse(np.all(np.isfinite(keras.ops.convert_to_numpy(stock(_X)))))
        fixed = convert.apply_policy(
            model, "mixed_float16", float32_names=report.recommended_float32_layers)
        self.assertEqual(fixed.get_layer("big").dtype_policy.name, "float32")
        self.assertEqual(fixed.get_layer("benign").dtype_policy.name, "mixed_float16")
        self.assertAllClose(fixed(_X), reference, rtol=1e-2, atol=0)
        again = audit.audit_model(fixed, _X, policy=None)  # The model's own policies.
        self.assertEqual(again.policy, None)
        self.assertEqual(again.dtype, "float16")
        self.assertFalse(any(row.overflow for row in again.layers))
        self.assertEqual(again.recommended_float32_layers, [])
        self.assertLess(_rows(again)["head"].relative_error, 1e-2)

    def test_underflowing_layer_flagged_and_fixed(self):
        model = _underflow_model()
        report = audit.audit_model(model, _X)
        rows = _rows(report)
        self.assertLess(rows["tiny"].max_abs_activation, audit.FLOAT16_TINY)
        self.assertEqual(rows["tiny"].underflow_fraction, 1.0)
        self.assertTrue(rows["tiny"].recommend_float32)
        self.assertRegex(rows["tiny"].reason, r"100% of non-zero activations < float16 smallest")
        self.assertTrue(rows["restore"].recommend_float32)
        self.assertFalse(rows["benign"].recommend_float32)
        self.assertAlmostEqual(rows["head"].relative_error, 1.0, places=3)  # Output lost.
        fixed = convert.apply_policy(model, float32_names=report.recommended_float32_layers)
        again = audit.audit_model(fixed, _X, policy=None)
        self.assertEqual(again.recommended_float32_layers, [])
        self.assertEqual(_rows(again)["tiny"].underflow_fraction, 0.0)  # float32 keeps it.
        self.assertLess(_rows(again)["head"].relative_error, 1e-2)

    def test_bfloat16_range_does_not_overflow(self):
        report = audit.audit_model(_overflow_model(), _X, policy="mixed_bfloat16")
        self.assertEqual(report.dtype, "bfloat16")
        self.assertFalse(_rows(report)["big"].overflow)
        self.assertEqual(report.recommended_float32_layers, [])
        self.assertLess(_rows(report)["head"].relative_error, 0.05)

    def test_float32_only_layer_audited_in_float32(self):
        model = keras.Sequential([
            keras.Input((4,)), _dense(8, 0.5, "benign"), tfmp.layers.Softmax(name="softmax"),
            keras.layers.Dense(2, name="head")])
        rows = _rows(audit.audit_model(model, _X))
        self.assertEqual((rows["benign"].dtype, rows["softmax"].dtype), ("float16", "float32"))
        self.assertFalse(rows["softmax"].recommend_float32)

    def test_nested_model_rows_and_patterns(self):
        inner = keras.Sequential([keras.Input((8,)), _dense(8, 1e4, "in_big"),
                                  _dense(8, 1e-3, "in_shrink")], name="inner")
        inputs = keras.Input((4,))
        outputs = keras.layers.Dense(2, name="head")(inner(_dense(8, 0.5, "first")(inputs)))
        model = keras.Model(inputs, outputs)
        report = audit.audit_model(model, _X)
        self.assertEqual([row.name for row in report.layers],
                         ["first", "inner/in_big", "inner/in_shrink", "head"])
        self.assertEqual(report.recommended_float32_layers, ["in_big", "in_shrink"])
        fixed = convert.apply_policy(model, float32_names=report.recommended_float32_layers)
        self.assertAllFinite(fixed(_X))
        self.assertEqual(audit.audit_model(fixed, _X, policy=None).recommended_float32_layers, [])

    def test_keras_ops_call_blames_its_producer(self):
        # apply_policy cannot clone graphs with keras.ops calls yet, so the walker is
        # driven directly with a float32 and a mixed_float16 build of the same model.
        def build():
            inputs = keras.Input((4,))
            h = _dense(8, 3.0, "pre")(inputs)  # |a| ~12
            h = keras.ops.exp(h)  # ~1.6e5: overflows float16, follows its input's dtype.
            return keras.Model(inputs, keras.layers.Dense(2, name="head")(h))

        f32 = build()
        with tfmp.policy_scope("mixed_float16"):
            mixed = build()
        mixed.set_weights(f32.get_weights())
        walker = audit._Walker("float16", training=False)
        walker.walk(f32, mixed, [_X], [_X], [[]], "")
        pre, exp, head = walker.rows
        self.assertEqual((pre.name, exp.type, head.name), ("pre", "op:Exp", "head"))
        self.assertTrue(exp.overflow)
        self.assertFalse(exp.recommend_float32)  # An op has no policy to change.
        self.assertRegex(exp.reason, r"^keras.ops call follows its inputs' dtype")
        self.assertTrue(pre.recommend_float32)
        self.assertRegex(pre.reason, rf"feeds '{exp.name}'")
        self.assertTrue(head.recommend_float32)
        self.assertRegex(head.reason, rf"input from '{exp.name}'")

    def test_training_mode(self):
        model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(name="bn"),
                                  keras.layers.Dense(2, name="head")])
        x = 1000 + 100 * _X  # Moving statistics (0, 1) pass it through; batch ones centre it.
        inference = _rows(audit.audit_model(model, x))["bn"].max_abs_activation
        training = _rows(audit.audit_model(model, x, training=True))["bn"].max_abs_activation
        self.assertGreater(inference, 500)
        self.assertLess(training, 5)

    @requires_tensorflow
    def test_recommended_scale_removes_gradient_underflow(self):
        model = _gradient_model()
        rng = np.random.default_rng(1)
        x = rng.normal(size=(16, 16)).astype("float32")
        y = rng.normal(size=(16, 1)).astype("float32")
        report = audit.audit_model(model, x, y, loss=_tiny_mse)
        grads = report.gradients
        scale = report.recommended_initial_scale
        self.assertGreater(grads.underflow_fraction_unscaled, 0.99)
        self.assertLess(grads.underflow_fraction_scaled, 0.01)
        self.assertEqual(grads.scale, scale)
        self.assertEqual(scale, audit.recommended_loss_scale(grads.max_abs))
        self.assertEqual(sum(grads.histogram["counts"]), grads.nonzero)
        self.assertLess(grads.histogram["exponents"][-1], -24)  # All below 2**-24.
        # For real: float16 gradients of the converted model, unscaled and scaled.
        mixed = convert.apply_policy(model, "mixed_float16")
        hidden = [v for layer in mixed.layers[:2] for v in layer.trainable_variables]

        def zero_share(loss_scale):
            with tf.GradientTape() as tape:
                loss = _tiny_mse(y, mixed(x)) * loss_scale
            g = [keras.ops.convert_to_numpy(t) / loss_scale for t in tape.gradient(loss, hidden)]
            return np.mean(np.concatenate([t.ravel() for t in g]) == 0), g

        unscaled, _ = zero_share(1.0)
        scaled, scaled_grads = zero_share(scale)
        self.assertGreater(unscaled, 0.9)
        self.assertLess(scaled, 0.05)
        with tf.GradientTape() as tape:
            loss = _tiny_mse(y, model(x))
        float32_grads = tape.gradient(
            loss, [v for layer in model.layers[:2] for v in layer.trainable_variables])
        for got, want in zip(scaled_grads, float32_grads, strict=True):
            np.testing.assert_allclose(got, want, rtol=0.05, atol=1e-12)

    def test_given_loss_scale_and_compiled_loss(self):
        model = _gradient_model()
        model.compile(loss="mse")  # The audit's default loss.
        rng = np.random.default_rng(2)
        x = rng.normal(size=(8, 16)).astype("float32")
        y = rng.normal(size=(8, 1)).astype("float32")
        report = audit.audit_model(model, x, y, loss_scale=1.0)
        grads = report.gradients
        self.assertEqual(grads.scale, 1.0)
        self.assertEqual(grads.underflow_fraction_scaled, grads.underflow_fraction_unscaled)
        self.assertGreater(grads.max_abs, 1e-3)  # An ordinary MSE, not the 1e-9 one.
        self.assertEqual(report.recommended_initial_scale,
                         audit.recommended_loss_scale(grads.max_abs))
        self.assertIsNone(audit.audit_model(
            model, x, y, policy="mixed_bfloat16").recommended_initial_scale)

    @parameterized.named_parameters(
        ("milli", 1e-3, 2.0**20),
        ("large", 1e5, 1.0),
        ("tiny", 1e-12, 2.0**24),
        ("zero", 0.0, 2.0**24),
        ("edge", audit.FLOAT16_MAX * audit.GRADIENT_HEADROOM, 1.0),
    )
    def test_recommended_loss_scale(self, max_abs, expected):
        scale = audit.recommended_loss_scale(max_abs)
        self.assertEqual(scale, expected)
        if 1.0 < scale < 2.0**24:
            limit = audit.FLOAT16_MAX * audit.GRADIENT_HEADROOM
            self.assertLessEqual(max_abs * scale, limit)
            self.assertGreater(max_abs * scale * 2, limit)

    def test_gradient_histogram_bins(self):
        grads, _ = audit._gradient_audit(
            [np.array([0.5, 0.75, 1.0, -3.0, 0.0])], [np.array([2.0**-30])], "float16", None)
        self.assertEqual(grads.histogram, {"exponents": list(range(-30, 2)),
                                           "counts": [1] + [0] * 28 + [2, 1, 1]})
        self.assertEqual((grads.count, grads.nonzero), (6, 5))
        self.assertEqual(grads.underflow_fraction_unscaled, 0.2)
        self.assertEqual(grads.weights["count"], 5)
        self.assertEqual(grads.activations["underflow_fraction_unscaled"], 1.0)

    def test_to_dict_table_and_plot(self):
        report = audit.audit_model(_overflow_model(), _X, np.zeros((8,), "int32"),
                                   loss="sparse_categorical_crossentropy")
        d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
        self.assertEqual(d["recommended_float32_layers"], ["big", "shrink"])
        self.assertEqual(set(d["layers"][0]) >= {
            "name", "max_abs_activation", "overflow", "underflow_fraction", "relative_error",
            "recommend_float32", "reason"}, True)
        self.assertIsNone(d["layers"][-1]["relative_error"])  # inf in the mixed run.
        self.assertTrue({"histogram", "underflow_fraction_unscaled", "underflow_fraction_scaled",
                         "max_abs"} <= set(d["gradients"]))
        self.assertEqual(d["recommended_initial_scale"], report.recommended_initial_scale)
        table = str(report)
        self.assertIn("big", table)
        self.assertIn("Recommended float32 layers: ['big', 'shrink']", table)
        self.assertIn("Recommended initial loss scale: 2**", table)
        path = report.plot(os.path.join(self.tmp_dir(), "audit.png"))
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    def test_single_layer_model(self):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="only")])
        report = audit.audit_model(model, _X, np.zeros((8, 2), "float32"), loss="mse")
        self.assertEqual([row.name for row in report.layers], ["only"])
        self.assertEqual(report.layers[0].dtype, "float32")  # The output layer stays float32.
        self.assertEqual(report.gradients.weights["count"], 4 * 2 + 2)
        inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="inner_only")],
                                 name="inner")
        outer = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(1, name="head")])
        self.assertEqual([row.name for row in audit.audit_model(outer, _X).layers],
                         ["inner/inner_only", "head"])

    def test_nonfinite_input_data_is_a_finding(self):
        x = _X.copy()
        x[0, 0], x[1, 1] = np.nan, np.inf
        y = np.zeros((8,), "float32")
        y[3] = np.nan
        report = audit.audit_model(_gradient_model_4(), x, y, loss="mse")
        self.assertEqual(report.nonfinite_inputs, {"x": 2, "y": 1})
        d = json.loads(json.dumps(report.to_dict(), allow_nan=False))  # strict JSON
        self.assertEqual(d["nonfinite_inputs"], {"x": 2, "y": 1})
        self.assertIsNone(d["gradients"]["max_abs"])  # NaN gradients: None, not NaN
        self.assertIn("Input data is not finite (x: 2, y: 1 NaN/inf values)", report.table())
        self.assertEqual(audit.audit_model(_gradient_model_4(), _X).nonfinite_inputs, {})
        self.assertEqual(tfmp.audit_report.nonfinite_counts(
            {"a": np.ones(2), "b": np.array([np.nan])}, np.arange(3)), {"x['b']": 1})
        self.assertEqual(tfmp.audit_report.nonfinite_counts(
            [np.ones(2), np.array([np.inf, -np.inf])]), {"x[1]": 2})

    def test_failed_plot_keeps_the_previous_one(self):
        from matplotlib.figure import Figure

        report = audit.audit_model(_overflow_model(), _X)
        tmp = self.tmp_dir()
        path = report.plot(os.path.join(tmp, "audit.png"))
        with open(path, "rb") as f:
            before = f.read()

        def torn_savefig(fig, fname, **kwargs):
            with open(fname, "wb") as f:
                f.write(b"\x89PNG torn")
            raise OSError("disk full (simulated)")

        with mock.patch.object(Figure, "savefig", torn_savefig):
            with self.assertRaisesRegex(OSError, "simulated"):
                report.plot(path)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(os.listdir(tmp), ["audit.png"])

    def test_patterns_match_exactly(self):
        names = ["block[1]*", "a?b", "plain", "block1x"]
        for name in names:
            pattern = audit.fnmatch_escape(name)
            self.assertEqual([n for n in names if fnmatch.fnmatchcase(n, pattern)], [name])

    def test_activation_bytes_per_example(self):
        def build():
            return keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3),
                                     keras.layers.Flatten(), keras.layers.Dense(8)])

        f32 = build()
        with tfmp.policy_scope("mixed_float16"):
            mixed = build()
        expected = (4 * 4 * 4 + 64 + 8) * 4  # conv, flatten, dense outputs in float32.
        self.assertEqual(audit.activation_bytes_per_example(f32), expected)
        self.assertEqual(audit.activation_bytes_per_example(mixed), expected // 2)

    @parameterized.named_parameters(
        ("float32_policy", dict(policy="float32"), r"`policy` must be a mixed policy.*'float32'"),
        ("unknown_policy", dict(policy="fp8"), r"Unknown `policy`: 'fp8'"),
        ("x_shape", dict(x=np.ones((2, 5))), r"`x` has shape \(2, 5\).*expects \(None, 4\)"),
        ("y_without_loss", dict(y=np.zeros((8,))), r"`loss` is required when `y` is given"),
        ("loss_without_y", dict(loss="mse"), r"`loss` was given but `y` is None"),
        ("y_batch", dict(y=np.zeros((3,)), loss="mse"), r"`y` has \(3,\) examples but `x` has 8"),
        ("bad_loss", dict(y=np.zeros((8,)), loss="nope"), r"Unknown `loss`: 'nope'"),
        ("loss_scale", dict(loss_scale=-1.0), r"`loss_scale` must be a positive.*-1.0"),
        ("not_a_model", dict(model="model"), r"`model` must be a built keras.Sequential"),
        ("float32_model_own_policy", dict(policy=None),
         r"no layer of .* computes in float16 or bfloat16"),
    )
    def test_bad_input(self, kwargs, message):
        args = dict(model=_overflow_model(), x=_X)
        args.update(kwargs)
        with self.assertRaisesRegex(ValueError, message):
            audit.audit_model(args.pop("model"), args.pop("x"), **args)


def _run_tool(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "tools.audit", *args], cwd=_REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _refusing_dir(test):
    """A directory where no new file can be made (read-only; /sys when running as root)."""
    path = test.tmp_dir()
    os.chmod(path, 0o555)
    test.addCleanup(os.chmod, path, 0o755)
    for candidate in (path, "/sys"):
        try:
            fd, probe = tempfile.mkstemp(dir=candidate)
        except OSError:
            return candidate
        os.close(fd)
        os.remove(probe)
    test.skipTest("no directory here refuses new files (root without a read-only /sys)")


class AuditToolTest(TestCase):

    def test_cli_writes_report_and_plot(self):
        tmp = self.tmp_dir()
        model = _overflow_model()
        model.compile(loss="sparse_categorical_crossentropy")
        model.save(os.path.join(tmp, "m.keras"))
        np.savez(os.path.join(tmp, "batch.npz"), x=_X, y=np.zeros((8,), "int32"))
        out = os.path.join(tmp, "out")
        result = _run_tool(f"--model={tmp}/m.keras", f"--data={tmp}/batch.npz", f"--out_dir={out}")
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertIn("Recommended float32 layers: ['big', 'shrink']", result.stdout)
        with open(os.path.join(out, "report.json")) as f:
            report = json.load(f)
        self.assertTrue({"layers", "gradients", "recommended_initial_scale",
                         "recommended_float32_layers"} <= set(report))
        self.assertEqual([row["name"] for row in report["layers"]],
                         ["benign", "big", "shrink", "head"])
        self.assertIsNotNone(report["gradients"])  # y and the compiled loss.
        with open(os.path.join(out, "audit.png"), "rb") as f:
            self.assertEqual(f.read(4), b"\x89PNG")

    def test_nonfinite_data_is_reported_and_the_report_replaced_whole(self):
        from tools import audit as audit_tool

        tmp = self.tmp_dir()
        model = _overflow_model()
        model.compile(loss="sparse_categorical_crossentropy")
        model.save(os.path.join(tmp, "m.keras"))
        x = _X.copy()
        x[2, 3] = np.nan
        np.savez(os.path.join(tmp, "batch.npz"), x=x, y=np.zeros((8,), "int32"))
        out = os.path.join(tmp, "out")
        os.mkdir(out)
        with open(os.path.join(out, "report.json"), "w") as f:
            f.write('{"previous": true}')
        printed = []
        result = audit_tool.audit(model_path=f"{tmp}/m.keras", data_path=f"{tmp}/batch.npz",
                                  out_dir=out, print_fn=printed.append)

        def no_constants(name):
            raise AssertionError(f"{name} in report.json")

        with open(os.path.join(out, "report.json")) as f:
            report = json.load(f, parse_constant=no_constants)
        self.assertEqual(report, result)
        self.assertEqual(report["nonfinite_inputs"], {"x": 1})
        self.assertIn("Input data is not finite (x: 1 NaN/inf values)", printed[0])
        self.assertEqual(sorted(os.listdir(out)), ["audit.png", "report.json"])

    @parameterized.named_parameters(
        ("out_dir_is_a_file", "file", r"`out_dir` exists and is not a directory"),
        ("report_is_a_directory", "report_dir",
         r"`out_dir` holds a report\.json that is not a file"),
        ("parent_not_writable", "read_only", r"`out_dir` cannot be written: '.*' refuses new "
         r"files \(.*\)"),
    )
    def test_cli_refuses_an_unusable_out_dir_before_any_work(self, case, message):
        tmp = self.tmp_dir()
        if case == "file":
            out = os.path.join(tmp, "out")
            with open(out, "w") as f:
                f.write("mine")
        elif case == "report_dir":
            out = tmp
            os.mkdir(os.path.join(out, "report.json"))
        else:
            out = os.path.join(_refusing_dir(self), "out")
        before = sorted(os.listdir(tmp))
        # --model is missing too: the out_dir is checked first, before any work.
        result = _run_tool(f"--model={tmp}/missing.keras", f"--data={tmp}/batch.npz",
                           f"--out_dir={out}")
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        self.assertEqual(len(errors), 1, result.stderr)
        self.assertRegex(errors[0], "^error: " + message + ".*Received: out_dir=")
        self.assertEqual(sorted(os.listdir(tmp)), before)

    @parameterized.named_parameters(
        ("missing_model", "missing", r"`model` is not a file"),
        ("no_x", "no_x", r"`data` has no array 'x'"),
        ("shape", "shape", r"`x` has shape \(8, 5\)"),
    )
    def test_cli_bad_input(self, case, message):
        tmp = self.tmp_dir()
        _overflow_model().save(os.path.join(tmp, "m.keras"))
        np.savez(os.path.join(tmp, "batch.npz"), **(
            {"z": _X} if case == "no_x" else {"x": np.ones((8, 5), "float32")}))
        model = os.path.join(tmp, "missing.keras" if case == "missing" else "m.keras")
        result = _run_tool(f"--model={model}", f"--data={tmp}/batch.npz", f"--out_dir={tmp}")
        self.assertEqual(result.returncode, 2)  # bad input: a usage error (tfmp.cli)
        self.assertNotIn("Traceback", result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        self.assertEqual(len(errors), 1, result.stderr)
        self.assertRegex(errors[0], message)
        self.assertFalse(os.path.exists(os.path.join(tmp, "report.json")))
