"""Tests for tfmp.cli: the exit convention every recipe and tool shares, and its checks."""

import io
import os
from contextlib import redirect_stderr
from unittest import mock

from absl import flags
from absl.testing import parameterized

from tests import base, recipe_helpers
from tests.base import HAS_TENSORFLOW, TestCase, requires_tensorflow_installed
from tfmp import backup, callbacks, cli


def _flag_values():
    values = flags.FlagValues()
    flags.DEFINE_integer("batch_size", 8, "Batch size.", flag_values=values)
    return values


def _call(main, argv=("prog",), **kwargs):
    """`cli.call(main, argv)`: the exit status and the stderr lines."""
    stderr = io.StringIO()
    with redirect_stderr(stderr):
        status = cli.call(main, list(argv), **kwargs)
    return status, stderr.getvalue().splitlines()


def _raises(error):
    def main(argv):
        raise error
    return main


class ParseFlagsTest(TestCase):
    @parameterized.named_parameters(
        ("unknown_flag", ["prog", "--nosuchflag"],
         r"^Unknown command line flag 'nosuchflag' \(--helpfull lists the flags\)$"),
        ("not_an_integer", ["prog", "--batch_size=abc"],
         r"^flag --batch_size=abc: invalid literal for int\(\) with base 10: 'abc'"),
    )
    def test_bad_flag_is_a_usage_error(self, argv, message):
        with self.assertRaisesRegex(cli.UsageError, message):
            cli.parse_flags(argv, _flag_values())

    def test_good_flags_leave_the_positional_arguments(self):
        values = _flag_values()
        self.assertEqual(cli.parse_flags(["prog", "--batch_size=4", "x"], values), ["prog", "x"])
        self.assertEqual(values.batch_size, 4)

    def test_check_no_arguments(self):
        cli.check_no_arguments(["prog"])
        with self.assertRaisesRegex(cli.UsageError, r"^unexpected arguments .*\['x'\]$"):
            cli.check_no_arguments(["prog", "x"])


class CallTest(TestCase):
    @parameterized.named_parameters(
        ("usage_error", cli.UsageError("`x` must be 1.\n Received: x=2"), 2,
         "error: `x` must be 1. Received: x=2"),
        ("failure", RuntimeError("boom\nat step 3"), 1, "error: RuntimeError: boom at step 3"),
        ("failure_without_message", KeyError(), 1, "error: KeyError"),
        ("tfmp_failure_speaks_plainly", callbacks.LossScaleError("100 steps skipped"), 1,
         "error: 100 steps skipped"),
        ("keras_colours_removed", ValueError("\x1b[1mbad layer\x1b[0m"), 1,
         "error: ValueError: bad layer"),
    )
    def test_one_line_and_status(self, error, status, line):
        self.assertEqual(_call(_raises(error)), (status, [line]))

    @parameterized.named_parameters(
        ("value_error", ValueError("`seed` must be >= 0")),
        ("file_not_found", FileNotFoundError("prepare the dataset with download_and_prepare")),
    )
    def test_errors_inside_usage_errors_exit_2(self, error):
        def main(argv):
            with cli.usage_errors():
                raise error

        self.assertEqual(_call(main), (2, [f"error: {error}"]))

    def test_backup_error_is_a_usage_error(self):
        class BackupError(RuntimeError):
            pass

        with mock.patch.object(backup, "BackupError", BackupError, create=True):
            status, lines = _call(_raises(BackupError("backup/latest is corrupt")))
        self.assertEqual((status, lines), (2, ["error: backup/latest is corrupt"]))

    def test_status_of_main(self):
        self.assertEqual(_call(lambda argv: None), (0, []))
        self.assertEqual(_call(lambda argv: 3), (3, []))

    def test_traceback_on_request(self):  # --verbose
        status, lines = _call(_raises(RuntimeError("boom")), traceback=True)
        self.assertEqual(status, 1)
        self.assertEqual(lines[0], "Traceback (most recent call last):")
        self.assertEqual(lines[-1], "error: RuntimeError: boom")

    def test_long_message_is_cut(self):
        status, lines = _call(_raises(RuntimeError("x" * 5000)))
        self.assertEqual(len(lines), 1)
        self.assertLess(len(lines[0]), 2100)
        self.assertTrue(lines[0].endswith(" [...]"))


class OutputPathTest(TestCase):
    def setUp(self):
        super().setUp()
        self.dir, self.file = self.tmp_dir_with_a_file()

    def test_writable_dirs(self):
        for path in (self.dir, os.path.join(self.dir, "new", "deeper")):
            self.assertEqual(cli.check_output_dir(path, argument="model_dir"), path)
        self.assertEqual(cli.check_output_dir(self.dir, argument="export_dir", replaced=True),
                         self.dir)

    @parameterized.named_parameters(
        ("is_a_file", "afile", r"^`out` exists and is not a directory. Received: out='.*afile'$"),
        ("under_a_file", "afile/sub",
         r"^`out` cannot be created: '.*afile' is not a directory. Received: out='.*sub'$"),
    )
    def test_bad_dirs(self, name, message):
        with self.assertRaisesRegex(cli.UsageError, message):
            cli.check_output_dir(os.path.join(self.dir, name), argument="out")

    def test_read_only_dir(self):
        # Root ignores permission bits, so os.access stands for a read-only file system here.
        def access(path, mode):
            return os.path.realpath(path) != os.path.realpath(self.dir)

        with mock.patch("os.access", side_effect=access):
            for path, replaced in ((self.dir, False), (os.path.join(self.dir, "new"), False),
                                   (os.path.join(self.dir, "export"), True)):
                with self.assertRaisesRegex(
                        cli.UsageError, r"^`out` cannot be written: '.*' is read-only or not "
                        r"writable by this user. Received: out="):
                    cli.check_output_dir(path, argument="out", replaced=replaced)
            with self.assertRaisesRegex(cli.UsageError, r"^`json` cannot be written"):
                cli.check_output_file(os.path.join(self.dir, "r.json"), argument="json")

    @parameterized.named_parameters(
        ("directory", ".", r"^`json` is a directory; pass a file path. Received: json="),
        ("missing_directory", "no/r.json", r"^`json`'s directory '.*no' does not exist"),
        ("under_a_file", "afile/r.json", r"^`json`'s directory '.*afile' does not exist or is "
         "not a directory"),
    )
    def test_bad_files(self, name, message):
        with self.assertRaisesRegex(cli.UsageError, message):
            cli.check_output_file(os.path.join(self.dir, name), argument="json")

    def test_writable_file(self):
        for path in (self.file, os.path.join(self.dir, "r.json")):
            self.assertEqual(cli.check_output_file(path, argument="json"), path)


# Every recipe and tool parses its flags through tfmp.cli.run.
_PROGRAMS = ("recipes.image_classification", "recipes.text_classification",
             "tools.inspect_policy", "tools.benchmark", "tools.bench_optimizer",
             "tools.launch_local", "tools.audit", "tools.export_savedmodel",
             "tools.bench_monitor", "tools.export_tflite")


class CommandLineTest(TestCase):
    @parameterized.named_parameters(("image", "recipes.image_classification"),
                                    ("text", "recipes.text_classification"))
    def test_recipe_without_tensorflow_is_one_line_exit_1(self, module):
        proc = recipe_helpers.run_cli(module, "--epochs=1", without_tensorflow=True)
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
        [line] = recipe_helpers.error_lines(proc.stderr)
        self.assertRegex(line, r"^error: ImportError: tfmp\.data needs TensorFlow, which is not "
                               r"installed here \(.*\): pip install tensorflow ")

    @parameterized.named_parameters(*[(name.split(".")[1], name) for name in _PROGRAMS])
    def test_unknown_flag_is_one_line_exit_2(self, module):
        if module.startswith("recipes.") and not HAS_TENSORFLOW:
            self.skipTest("the recipes need TensorFlow before they parse a flag")
        proc = recipe_helpers.run_cli(module, "--nosuchflag")
        self.assertEqual(proc.returncode, 2, proc.stderr)
        # The whole of stderr: TensorFlow's native start-up lines are hidden too.
        self.assertEqual(proc.stderr.splitlines(),
                         ["error: Unknown command line flag 'nosuchflag' "
                          "(--helpfull lists the flags)"])

    @requires_tensorflow_installed
    def test_verbose_shows_tensorflows_native_start_up(self):
        plain = base.run_python(["-c", "import tensorflow"])
        if not plain.stderr.strip():
            self.skipTest("this TensorFlow prints nothing natively at start-up")
        quiet = recipe_helpers.run_cli("tools.inspect_policy", "--nosuchflag")
        verbose = recipe_helpers.run_cli("tools.inspect_policy", "--nosuchflag", "--verbose")
        self.assertEqual((quiet.returncode, verbose.returncode), (2, 2))
        self.assertEqual(len(quiet.stderr.splitlines()), 1, quiet.stderr)
        self.assertIn(plain.stderr.strip().splitlines()[0], verbose.stderr)
        self.assertEqual(verbose.stderr.splitlines()[-1], quiet.stderr.splitlines()[0])
