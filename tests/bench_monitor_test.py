"""Tests for tools/bench_monitor.py: fit with and without the LossScaleMonitor."""

from absl.testing import parameterized

import tfmp
from tests import recipe_helpers
from tests.base import TestCase
from tools import bench_monitor


class BenchMonitorTest(TestCase):
    def test_tiny_benchmark_returns_positive_ratios(self):
        results = bench_monitor.benchmark(steps=4, batch_size=4, units=8, layers=1, repeats=2,
                                          steps_per_execution=2)
        self.assertEqual(list(results["ratios"]), list(bench_monitor.VARIANTS[1:]))
        self.assertTrue(all(ratio > 0 for ratio in results["ratios"].values()), results)
        self.assertGreater(results["no_monitor_ms_per_step"], 0)
        self.assertIn(results["device"], ("CPU", "GPU", "TPU"))
        text = bench_monitor.format_results(results)
        self.assertRegex(text, r"\ndefault / no monitor +\d+\.\d{3}$")
        self.assertIn("steps_per_execution=2", text)

    @parameterized.named_parameters(
        ("steps", dict(steps=0), r"^`steps` must be an integer >= 1. Received: steps=0$"),
        ("repeats_bool", dict(repeats=True), "repeats=True"),
        ("not_dividing", dict(steps=6, steps_per_execution=4),
         r"^`steps` must be a multiple of `steps_per_execution`"),
    )
    def test_bad_argument(self, kwargs, message):
        with self.assertRaisesRegex(tfmp.cli.UsageError, message):
            bench_monitor.benchmark(**kwargs)

    def test_command_line_prints_the_ratios(self):
        proc = recipe_helpers.run_cli("tools.bench_monitor", "--steps=2", "--batch_size=4",
                                      "--units=8", "--layers=1", "--repeats=1")
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        self.assertRegex(proc.stdout, r"check_every=1 / no monitor +\d+\.\d{3}\n")
        self.assertRegex(proc.stdout, r"default / no monitor +\d+\.\d{3}\n")

    def test_command_line_bad_flag_is_one_line(self):
        proc = recipe_helpers.run_cli("tools.bench_monitor", "--steps=0")
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertEqual(recipe_helpers.error_lines(proc.stderr),
                         ["error: `steps` must be an integer >= 1. Received: steps=0"])
