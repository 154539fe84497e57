"""Tests for tfmp.distribute and multi-replica / multi-worker training.

Single device, MirroredStrategy over 2 logical CPUs and 2 workers of
MultiWorkerMirroredStrategy (2 processes, through tools.launch_local) train the
same global batches (tests/distributed_run.py) and must end with the same weights.
"""

import glob
import json
import os
import signal
import subprocess
import time
from unittest import mock

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tfmp
from tests import distributed_run, recipe_helpers
from tests.base import TestCase


def _launch(out_dir, *flags, num_workers=2):
    cmd = recipe_helpers.command(
        "tools.launch_local", f"--num_workers={num_workers}", "--",
        *recipe_helpers.command("tests.distributed_run", f"--out_dir={out_dir}", *flags))
    proc = subprocess.run(cmd, cwd=recipe_helpers.REPO, env=recipe_helpers.ENV,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(proc.stdout[-4000:] + proc.stderr[-2000:])
    workers = []
    for i in range(num_workers):
        weights = np.load(os.path.join(out_dir, f"worker{i}.npz"))
        with open(os.path.join(out_dir, f"worker{i}.json")) as f:
            workers.append(([weights[f"arr_{k}"] for k in range(len(weights.files))],
                            json.load(f)))
    return workers


def _assert_same_weights(test, a, b, atol=1e-6):
    test.assertEqual(len(a), len(b))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol)


def _assert_bit_identical(test, a, b):
    """Workers of one job must agree exactly: any difference at all fails."""
    test.assertEqual(len(a), len(b))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y, strict=True)


class StrategyTest(TestCase):
    def test_unknown_distribution(self):
        with self.assertRaisesRegex(ValueError, "Unknown `distribution`: 'tpu'. Expected one "
                                    "of: none, mirrored, multi_worker."):
            tfmp.distribute.create_strategy("tpu")

    def test_none_and_mirrored(self):
        self.assertIs(tfmp.distribute.create_strategy("none"), tf.distribute.get_strategy())
        mirrored = tfmp.distribute.create_strategy("mirrored")
        self.assertEqual(mirrored.num_replicas_in_sync, 2)  # the two logical CPUs
        self.assertIs(tfmp.distribute.create_strategy("mirrored"), mirrored)

    def test_multi_worker_needs_tf_config(self):
        with mock.patch.dict(os.environ, {}, clear=False):
            os.environ.pop("TF_CONFIG", None)
            with self.assertRaisesRegex(ValueError, "needs the TF_CONFIG environment variable"):
                tfmp.distribute.create_strategy("multi_worker")

    @parameterized.named_parameters(
        ("not_json", "{cluster: 1", r"TF_CONFIG is not valid JSON \(Expecting property name"),
        ("not_an_object", "[]", r"TF_CONFIG must be a JSON object, not list"),
        ("no_cluster", '{"task": {"type": "worker", "index": 0}}', r'TF_CONFIG has no "cluster"'),
        ("empty_cluster", '{"cluster": {}, "task": {"type": "worker", "index": 0}}',
         r'TF_CONFIG has no "cluster"'),
        ("bad_address", '{"cluster": {"worker": ["host1"]}, "task": {"type": "worker", '
         '"index": 0}}', r'TF_CONFIG cluster.worker must be a non-empty list of "host:port"'),
        ("no_task", '{"cluster": {"worker": ["a:1", "b:2"]}}', r'TF_CONFIG has no "task"'),
        ("unknown_task_type", '{"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", '
         '"index": 0}}', r"TF_CONFIG task.type must be one of the cluster's jobs \(worker\), "
         r"not 'ps'"),
        ("index_out_of_range", '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": '
         '"worker", "index": 2}}', r"TF_CONFIG task.index must be an integer in \[0, 2\) for "
         r"the 2 worker address\(es\), not 2"),
    )
    def test_bad_tf_config_is_named(self, tf_config, message):
        with mock.patch.dict(os.environ, {"TF_CONFIG": tf_config}):
            with self.assertRaisesRegex(ValueError, rf"^{message}.* Received: TF_CONFIG='"):
                tfmp.distribute.create_strategy("multi_worker")
        self.assertNotIn("multi_worker", tfmp.distribute._STRATEGIES)

    def test_good_tf_config(self):
        config = ('{"cluster": {"chief": ["a:1"], "worker": ["b:2"]}, '
                  '"task": {"type": "worker", "index": 0}}')
        self.assertEqual(tfmp.distribute.parse_tf_config(config)["task"]["type"], "worker")

    @parameterized.named_parameters(
        ("no_cluster", None, None, {}, True),
        ("chief", "chief", 0, {"chief": ["a"], "worker": ["b"]}, True),
        ("worker0_without_chief", "worker", 0, {"worker": ["a", "b"]}, True),
        ("worker1", "worker", 1, {"worker": ["a", "b"]}, False),
        ("worker0_with_chief", "worker", 0, {"chief": ["a"], "worker": ["b"]}, False),
    )
    def test_is_chief(self, task_type, task_id, cluster, expected):
        strategy = mock.Mock()
        strategy.cluster_resolver = mock.Mock(task_type=task_type, task_id=task_id)
        with mock.patch.dict(os.environ, {"TF_CONFIG": json.dumps({"cluster": cluster})}):
            self.assertEqual(tfmp.distribute.is_chief(strategy), expected)


class EquivalenceTest(TestCase):
    def test_two_replicas_equal_one_device_with_global_clipnorm(self):
        single, single_state = distributed_run.train(tf.distribute.get_strategy(), clipnorm=0.5)
        mirrored, state = distributed_run.train(tfmp.distribute.create_strategy("mirrored"),
                                                clipnorm=0.5)
        _assert_same_weights(self, single, mirrored)
        self.assertEqual(state, single_state)

    def test_two_replicas_equal_one_device_with_scaling_disabled(self):
        # enabled=False (every policy but mixed_float16 in the recipes) still all-reduces.
        single, _ = distributed_run.train(tf.distribute.get_strategy(), clipnorm=0.5,
                                          enabled=False)
        mirrored, state = distributed_run.train(tfmp.distribute.create_strategy("mirrored"),
                                                clipnorm=0.5, enabled=False)
        _assert_same_weights(self, single, mirrored)
        self.assertEqual(state["iterations"], distributed_run.STEPS)

    def test_two_workers_equal_one_device_with_global_clipnorm(self):
        single, single_state = distributed_run.train(tf.distribute.get_strategy(), clipnorm=0.5)
        workers = _launch(self.tmp_dir(), "--clipnorm=0.5")
        for weights, state in workers:
            _assert_same_weights(self, single, weights)
            self.assertEqual(state, single_state)
        _assert_bit_identical(self, workers[0][0], workers[1][0])

    def test_nan_on_one_worker_skips_the_step_on_all(self):
        mirrored, mirrored_state = distributed_run.train(
            tfmp.distribute.create_strategy("mirrored"), nan_replica=1, nan_step=2)
        workers = _launch(self.tmp_dir(), "--nan_replica=1", "--nan_step=2")
        (w0, s0), (w1, s1) = workers
        self.assertEqual(s0, {"loss_scale": 128.0, "skipped_steps": 1.0, "iterations": 3.0})
        self.assertEqual(s1, s0)
        _assert_bit_identical(self, w0, w1)
        _assert_same_weights(self, w0, mirrored)
        self.assertEqual(mirrored_state, s0)
        self.assertAllFinite(w0)


class FaultToleranceTest(TestCase):
    def test_sigkill_one_worker_then_resume(self):
        model_dir = self.tmp_dir()
        cmd = recipe_helpers.command(
            "tools.launch_local", "--num_workers=2", "--",
            *recipe_helpers.command(
                "recipes.image_classification", "--distribution=multi_worker", "--epochs=8",
                "--steps_per_epoch=6", "--batch_size=16", "--image_size=16",
                "--num_synthetic=256", f"--model_dir={model_dir}"))
        proc = subprocess.Popen(cmd, cwd=recipe_helpers.REPO, env=recipe_helpers.ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        pids = {}
        for line in proc.stdout:
            if line.startswith("[launcher] worker "):
                _, _, index, _, pid = line.split()
                pids[int(index)] = int(pid)
            if len(pids) == 2:
                break
        latest = os.path.join(model_dir, "backup", "latest")
        deadline = time.time() + 240
        while not os.path.exists(latest) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(pids[1], signal.SIGKILL)
        output = proc.communicate(timeout=120)[0]
        self.assertEqual(proc.returncode, 128 + signal.SIGKILL, output[-3000:])
        self.assertIn("[launcher] worker 1 failed with status -9", output)
        with open(os.path.join(latest, "training_metadata.json")) as f:
            done = json.load(f)["epoch"]
        self.assertTrue(1 <= done < 8, done)

        again = subprocess.run(cmd, cwd=recipe_helpers.REPO, env=recipe_helpers.ENV,
                               capture_output=True, text=True, timeout=300)
        self.assertEqual(again.returncode, 0, again.stdout[-4000:])
        results = [recipe_helpers.results_of(line.split("] ", 1)[1])
                   for line in again.stdout.splitlines() if "] results: " in line]
        self.assertEqual(len(results), 2)
        for r in results:
            self.assertEqual(r["epochs_run"], 8 - done)
            self.assertEqual(r["optimizer_steps"], 48)  # restored optimizer state
        self.assertEqual(results[0]["loss_scale"], results[1]["loss_scale"])
        self.assertEqual(len(glob.glob(os.path.join(model_dir, "backup", "backup-*"))), 1)
