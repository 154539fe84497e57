"""Tests for tfmp.backup.BackupAndRestore (atomic, resumable backups)."""

import json
import os
import signal
from unittest import mock

import keras
import numpy as np
from absl.testing import parameterized
from keras import ops

import tfmp
from tests import io_test
from tests.base import TestCase
from tests.callbacks_test import _data, _model


class BackupAndRestoreTest(TestCase):
    def _fit(self, backup_dir, epochs, **kwargs):
        model = _model(keras.layers.Dense(4))
        model.compile(optimizer=tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.1)), loss="mse")
        cb = tfmp.callbacks.BackupAndRestore(backup_dir, delete_checkpoint=False, **kwargs)
        x, y = _data()
        history = model.fit(x, y, batch_size=4, epochs=epochs, callbacks=[cb], verbose=0,
                            shuffle=False)
        return model, history

    def test_a_failed_save_keeps_the_last_complete_backup(self):
        backup_dir = self.tmp_dir()
        model, _ = self._fit(backup_dir, epochs=1)
        saved = [w.copy() for w in model.get_weights()]

        def torn_write(self, filepath, overwrite=True):
            with open(filepath, "wb") as f:
                f.write(b"half")
            raise OSError("disk full")

        with mock.patch.object(keras.Model, "save_weights", torn_write):
            with self.assertRaisesRegex(OSError, "disk full"):
                self._fit(backup_dir, epochs=2)
        keras.backend.clear_session()
        restored, history = self._fit(backup_dir, epochs=1)  # already done: restores only
        self.assertEqual(history.history, {})
        for a, b in zip(saved, restored.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
        with open(os.path.join(backup_dir, "latest", "training_metadata.json")) as f:
            self.assertEqual(json.load(f)["epoch"], 1)
        # The torn directory was cleaned up at the next start.
        self.assertEqual(len([n for n in os.listdir(backup_dir) if n.startswith("backup-")]), 1)

    def test_restores_the_loss_scale_state(self):
        backup_dir = self.tmp_dir()
        x, y = _data()
        x[0, 0] = np.nan  # the first step is skipped and halves the scale
        model = _model(keras.layers.Dense(4))
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=64.0)
        model.compile(optimizer=opt, loss="mse")
        cb = tfmp.callbacks.BackupAndRestore(backup_dir, delete_checkpoint=False)
        model.fit(x, y, batch_size=4, epochs=1, callbacks=[cb], verbose=0, shuffle=False)
        keras.backend.clear_session()
        restored, _ = self._fit(backup_dir, epochs=1)  # nothing left to train: restore only
        for name in ("loss_scale", "skipped_steps", "iterations"):
            self.assertEqual(float(ops.convert_to_numpy(getattr(restored.optimizer, name))),
                             float(ops.convert_to_numpy(getattr(opt, name))), name)
        self.assertEqual(float(ops.convert_to_numpy(opt.loss_scale)), 32.0)
        self.assertEqual(int(ops.convert_to_numpy(restored.optimizer.iterations)), 3)

    def test_non_writer_never_writes(self):
        backup_dir = os.path.join(self.tmp_dir(), "b")
        self._fit(backup_dir, epochs=1, write=False)
        self.assertFalse(os.path.exists(backup_dir))


class BackupSafetyTest(TestCase):
    """Issue 9: a backup run never deletes outside backup_dir nor starts over silently."""

    _fit = BackupAndRestoreTest._fit

    def _backup(self, epochs=1):
        """A backup_dir holding one complete backup; returns it and the backup's path."""
        backup_dir = self.tmp_dir()
        self._fit(backup_dir, epochs=epochs)
        keras.backend.clear_session()
        return backup_dir, os.path.realpath(os.path.join(backup_dir, "latest"))

    def test_latest_pointing_outside_is_refused_and_deletes_nothing(self):
        _, elsewhere = self._backup()  # e.g. another run's backup, or a user's directory
        before = sorted(os.listdir(elsewhere))
        backup_dir = self.tmp_dir()
        os.symlink(elsewhere, os.path.join(backup_dir, "latest"))
        user_dir = os.path.join(self.tmp_dir(), "user")
        os.mkdir(user_dir)
        os.symlink(user_dir, os.path.join(backup_dir, "backup-abcd1234"))  # not tfmp's
        with self.assertRaisesRegex(
                tfmp.backup.BackupError,
                r"^'.*/latest' points at '.*backup-\w+', not at a backup inside the backup "
                r"directory; remove the backup directory '.*' to start over\.$"):
            self._fit(backup_dir, epochs=2)
        self.assertEqual(sorted(os.listdir(elsewhere)), before)
        self.assertTrue(os.path.isdir(user_dir))
        self.assertTrue(os.path.islink(os.path.join(backup_dir, "backup-abcd1234")))

    def test_a_second_run_on_the_directory_is_refused(self):
        backup_dir, latest = self._backup()
        in_progress = os.path.join(backup_dir, "backup-inprogre")  # the running one's next save
        os.mkdir(in_progress)
        proc = io_test.hold_lock(os.path.join(backup_dir, ".lock"))  # the running one
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        with self.assertRaisesRegex(
                tfmp.backup.BackupError,
                rf"^The backup directory '{backup_dir}' is in use by another run \(pid "
                rf"{proc.pid} holds '.*\.lock'\); wait for it to finish, or give this run "
                r"another directory\.$"):
            self._fit(backup_dir, epochs=2)
        self.assertTrue(os.path.isdir(in_progress))
        self.assertTrue(os.path.isdir(latest))
        # A reader (a non-chief worker) takes no lock.
        _, history = self._fit(backup_dir, epochs=2, write=False)
        self.assertLen(history.history["loss"], 1)

    def test_lock_is_held_while_training_and_released_when_the_run_dies(self):
        backup_dir = self.tmp_dir()
        lock_path = os.path.join(backup_dir, ".lock")
        proc = io_test.hold_lock(lock_path)
        os.kill(proc.pid, signal.SIGKILL)  # a run killed mid-training: its lock is stale
        proc.wait()
        held = []

        class Probe(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                try:
                    tfmp._io.FileLock(lock_path).acquire()
                    held.append(False)
                except tfmp._io.LockedError:
                    held.append(True)

        model = _model(keras.layers.Dense(4))
        model.compile(optimizer="sgd", loss="mse")
        x, y = _data()
        cb = tfmp.callbacks.BackupAndRestore(backup_dir, delete_checkpoint=False)
        model.fit(x, y, epochs=2, callbacks=[cb, Probe()], verbose=0)
        self.assertEqual(held, [True, True])
        with tfmp._io.FileLock(lock_path):  # free again after fit
            pass

    @parameterized.named_parameters(
        ("dangling_latest", "dangling", r"'.*/latest' points at 'backup-gone1234', which is "
         r"not a directory \(a dangling link\)"),
        ("garbage_weights", "garbage", r"The backup weights '.*/latest\.weights\.h5' cannot "
         r"be loaded \(\w+: .*\)"),
        ("truncated_weights", "truncated", r"The backup weights '.*/latest\.weights\.h5' "
         r"cannot be loaded \(OSError: .*truncated file.*\)"),
        ("missing_weights", "no_weights", r"The backup weights '.*/latest\.weights\.h5' are "
         "missing"),
        ("garbled_metadata", "garbled", r"The backup metadata '.*/training_metadata\.json' "
         r"cannot be read \(JSONDecodeError: .*\)"),
        ("metadata_without_epoch", "no_epoch", r"The backup metadata '.*training_metadata\.json'"
         r" cannot be read \(KeyError: 'epoch'\)"),
        ("missing_metadata", "no_metadata", r"The backup metadata "
         r"'.*/training_metadata\.json' is missing"),
    )
    def test_an_unusable_backup_is_one_line_and_nothing_starts_over(self, damage, message):
        backup_dir, latest = self._backup()
        weights = os.path.join(latest, "latest.weights.h5")
        metadata = os.path.join(latest, "training_metadata.json")
        if damage == "dangling":
            os.remove(os.path.join(backup_dir, "latest"))
            os.symlink("backup-gone1234", os.path.join(backup_dir, "latest"))
        elif damage in ("garbage", "truncated"):
            with open(weights, "rb") as f:
                data = f.read()
            with open(weights, "wb") as f:
                f.write(b"not an HDF5 file" if damage == "garbage" else data[:len(data) // 2])
        elif damage in ("garbled", "no_epoch"):
            with open(metadata, "w") as f:
                f.write('{"epoch": 1' if damage == "garbled" else '{"batch": 0}')
        else:
            os.remove(weights if damage == "no_weights" else metadata)
        before = sorted(os.listdir(backup_dir))
        with self.assertRaises(tfmp.backup.BackupError) as cm:
            self._fit(backup_dir, epochs=3)
        text = str(cm.exception)
        self.assertRegex(text, f"^{message}; remove the backup directory '{backup_dir}' "
                         r"to start over\.$")
        self.assertNotIn("\n", text)
        self.assertEqual(sorted(os.listdir(backup_dir)), before)  # nothing removed

    def test_backup_is_on_disk_before_latest_moves(self):
        backup_dir = self.tmp_dir()
        recorder = io_test._FsyncRecorder(self)
        self._fit(backup_dir, epochs=1)
        latest = os.path.join(backup_dir, "latest")
        new = os.path.realpath(latest)
        swap = next(i for i, e in enumerate(recorder.events)
                    if e[0] == "replace" and e[2] == latest)
        for flushed in (os.path.join(new, "latest.weights.h5"),
                        os.path.join(new, "training_metadata.json"), new):
            self.assertLess(recorder.index(("fsync", flushed)), swap, flushed)
        self.assertGreater(recorder.index(("fsync", os.path.realpath(backup_dir))), swap)

    def test_delete_checkpoint_removes_only_tfmps_entries(self):
        backup_dir = self.tmp_dir()
        with open(os.path.join(backup_dir, "notes.txt"), "w") as f:
            f.write("mine")
        model = _model(keras.layers.Dense(4))
        model.compile(optimizer="sgd", loss="mse")
        x, y = _data()
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[tfmp.callbacks.BackupAndRestore(backup_dir)])
        self.assertEqual(os.listdir(backup_dir), ["notes.txt"])
        os.remove(os.path.join(backup_dir, "notes.txt"))
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[tfmp.callbacks.BackupAndRestore(backup_dir)])
        self.assertFalse(os.path.exists(backup_dir))  # empty: removed
