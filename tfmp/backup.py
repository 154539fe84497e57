"""`BackupAndRestore`: Keras' backup callback with backups that are never half-written.

Re-exported as `tfmp.callbacks.BackupAndRestore`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import keras


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' `BackupAndRestore`, with backups that are never half-written.

    Keras writes the weights file and the epoch file in place, one after the
    other: a kill during a save can leave a torn weights file, or weights of one
    epoch beside the epoch number of another. This subclass writes both into a
    fresh directory and then swaps a `latest` symlink onto it (an atomic rename),
    so a restart always finds one complete backup. The backup holds the model's
    and the optimizer's variables, loss-scale state included.

    Args:
        backup_dir: Directory for the backups (used by this callback only).
        save_freq: `"epoch"` or a number of steps between backups.
        delete_checkpoint: Remove the backups when `fit` completes.
        write: Whether this process keeps its backups. Under multi-worker
            training only the chief keeps them; the other workers still save
            (reading variables that are synchronised on read, such as batch
            normalisation statistics, is a collective every worker must join),
            into a temporary directory that is removed at once. Every worker
            restores from the chief's backup.

    Example:

        model.fit(ds, epochs=10, callbacks=[tfmp.callbacks.BackupAndRestore("run/backup")])
    """

    _LATEST = "latest"

    def __init__(self, backup_dir: str, save_freq="epoch", delete_checkpoint: bool = True,
                 write: bool = True):
        super().__init__(backup_dir, save_freq=save_freq, delete_checkpoint=delete_checkpoint)
        self.write = write

    def _point_at(self, directory: str) -> None:
        self._weights_path = os.path.join(directory, "latest.weights.h5")
        self._training_metadata_path = os.path.join(directory, "training_metadata.json")

    def on_train_begin(self, logs=None):
        latest = os.path.join(self.backup_dir, self._LATEST)
        if self.write and os.path.isdir(self.backup_dir):
            # Directories of a save that was killed before its swap.
            keep = os.path.realpath(latest)
            for name in os.listdir(self.backup_dir):
                path = os.path.join(self.backup_dir, name)
                if name.startswith("backup-") and os.path.realpath(path) != keep:
                    shutil.rmtree(path, ignore_errors=True)
        if os.path.isdir(latest):
            self._point_at(os.path.realpath(latest))
            self._load_model()
            with open(self._training_metadata_path) as f:
                self._current_epoch = json.load(f)["epoch"]

    def _save_model(self):
        if not self.write:
            scratch = tempfile.mkdtemp(prefix="tfmp-backup-")
            try:
                self.model.save_weights(os.path.join(scratch, "scratch.weights.h5"))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return
        os.makedirs(self.backup_dir, exist_ok=True)
        latest = os.path.join(self.backup_dir, self._LATEST)
        previous = os.path.realpath(latest) if os.path.islink(latest) else None
        new = tempfile.mkdtemp(prefix="backup-", dir=self.backup_dir)
        self._point_at(new)
        self.model.save_weights(self._weights_path, overwrite=True)
        with open(self._training_metadata_path, "w") as f:
            json.dump({"epoch": self._current_epoch, "batch": self._last_batch_seen}, f)
        link = os.path.join(self.backup_dir, f".{self._LATEST}-{os.getpid()}")
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.basename(new), link)
        os.replace(link, latest)  # the atomic step
        if previous and previous != new:
            shutil.rmtree(previous, ignore_errors=True)

    def on_train_end(self, logs=None):
        if self.write and self.delete_checkpoint and os.path.exists(self.backup_dir):
            shutil.rmtree(self.backup_dir, ignore_errors=True)
