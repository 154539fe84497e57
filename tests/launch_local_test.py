"""Tests for tools.launch_local."""

import json
import sys
import time

from tests import recipe_helpers
from tests.base import TestCase
from tools import launch_local

_PRINT_CONFIG = "import os; print(os.environ['TF_CONFIG'])"


class LaunchLocalTest(TestCase):
    def test_tf_config_and_prefixed_output(self):
        lines = []
        status = launch_local.launch([sys.executable, "-c", _PRINT_CONFIG], 3,
                                     print_fn=lines.append)
        self.assertEqual(status, 0)
        configs = {}
        for line in lines:
            if line.startswith("[worker "):
                index, text = line[len("[worker "):].split("] ", 1)
                configs[int(index)] = json.loads(text)
        self.assertEqual(sorted(configs), [0, 1, 2])
        cluster = configs[0]["cluster"]["worker"]
        self.assertEqual(len(set(cluster)), 3)
        self.assertTrue(all(address.startswith("127.0.0.1:") for address in cluster))
        for index, config in configs.items():
            self.assertEqual(config["task"], {"type": "worker", "index": index})
            self.assertEqual(config["cluster"]["worker"], cluster)

    def test_a_failing_worker_stops_the_others(self):
        script = ("import json, os, sys, time\n"
                  "i = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"
                  "sys.exit(3) if i == 1 else time.sleep(60)\n")
        start = time.time()
        lines = []
        status = launch_local.launch([sys.executable, "-c", script], 2, print_fn=lines.append)
        self.assertEqual(status, 3)
        self.assertLess(time.time() - start, 30)
        self.assertIn("[launcher] worker 1 failed with status 3; stopping the others", lines)

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "`num_workers` must be an integer >= 1. "
                                    "Received: num_workers=0"):
            launch_local.launch(["true"], 0)
        proc = recipe_helpers.run_cli("tools.launch_local", "--num_workers=2", "--")
        self.assertEqual(proc.returncode, 2)
        self.assertEqual(recipe_helpers.error_lines(proc.stderr),
                         ["error: `command` is empty: give the worker command after `--`."])
