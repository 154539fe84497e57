"""Tests for tfmp.backup.BackupAndRestore (atomic, resumable backups)."""

import json
import os
from unittest import mock

import keras
import numpy as np
from keras import ops

import tfmp
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
