"""`BackupAndRestore`: Keras' backup callback with backups that are never half-written.

Re-exported as `tfmp.callbacks.BackupAndRestore`.

Layout of `backup_dir`: one directory a backup, `backup-XXXXXXXX/` (holding
`latest.weights.h5` and `training_metadata.json`), a symbolic link `latest`
naming the complete one, and a lock file `.lock`. Only what this layout
names is ever deleted, and only inside `backup_dir`: a `latest` that points
anywhere else, a backup that cannot be read, or a second run on the same
directory stops with a one-line `BackupError` instead of training from scratch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading

import keras

from tfmp import _io

_BACKUP_NAME = re.compile(r"^backup-[a-z0-9_]{8}$")  # tempfile.mkdtemp(prefix="backup-")
_LINK_NAME = re.compile(r"^\.latest-\d+$")  # The symlink of a swap killed before its rename.
_LOCK = ".lock"
# Locks this process holds, by backup directory: (thread that took it, FileLock).
_HELD: dict[str, tuple[threading.Thread, _io.FileLock]] = {}


class BackupError(RuntimeError):
    """A backup directory that cannot be used: in use, not tfmp's, or unreadable."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' `BackupAndRestore`, with backups that are never half-written.

    Keras writes the weights file and the epoch file in place, one after the
    other: a kill during a save can leave a torn weights file, or weights of one
    epoch beside the epoch number of another. This subclass writes both into a
    fresh directory, flushes them to disk, and then swaps a `latest` symlink onto
    it (an atomic rename), so a restart always finds one complete backup. The
    backup holds the model's and the optimizer's variables, loss-scale state
    included.

    A writer holds a lock on `backup_dir` from `fit`'s start to its end (the
    lock goes with the process, so a killed run leaves no lock behind): a second
    run on the same directory raises `BackupError` instead of deleting the first
    run's backups. On start it restores `latest`, and removes only the
    `backup-*` directories of saves that were killed before their swap. A
    `latest` that points outside `backup_dir` or at nothing, and a backup whose
    weights or metadata cannot be read, raise `BackupError` (remove
    `backup_dir` to start over); nothing starts from scratch silently.

    Args:
        backup_dir: Directory for the backups (used by this callback only).
        save_freq: `"epoch"` or a number of steps between backups.
        delete_checkpoint: Remove the backups when `fit` completes (tfmp's own
            entries only; `backup_dir` itself if that leaves it empty).
        write: Whether this process keeps its backups. Under multi-worker
            training only the chief keeps them (and locks `backup_dir`); the other
            workers still save (reading variables that are synchronised on read,
            such as batch normalisation statistics, is a collective every worker
            must join), into a temporary directory that is removed at once. Every
            worker restores from the chief's backup.

    Example:

        model.fit(ds, epochs=10, callbacks=[tfmp.callbacks.BackupAndRestore("run/backup")])
    """

    _LATEST = "latest"

    def __init__(self, backup_dir: str, save_freq="epoch", delete_checkpoint: bool = True,
                 write: bool = True):
        super().__init__(backup_dir, save_freq=save_freq, delete_checkpoint=delete_checkpoint)
        self.write = write
        self._lock: _io.FileLock | None = None

    # ------------------------------------------------------------- helpers

    def _error(self, what: str) -> BackupError:
        return BackupError(
            f"{what}; remove the backup directory {self.backup_dir!r} to start over.")

    def _latest_name(self) -> str | None:
        """The backup `latest` names (a real directory inside backup_dir), or None."""
        latest = os.path.join(self.backup_dir, self._LATEST)
        if not os.path.lexists(latest):
            return None
        if not os.path.islink(latest):
            raise self._error(f"{latest!r} is not the symbolic link tfmp writes")
        target = os.readlink(latest)
        if not _BACKUP_NAME.match(target):
            raise self._error(
                f"{latest!r} points at {target!r}, not at a backup inside the backup directory")
        path = os.path.join(self.backup_dir, target)
        if os.path.islink(path) or not os.path.isdir(path):
            raise self._error(f"{latest!r} points at {target!r}, which is not a directory "
                              "(a dangling link)")
        return target

    def _point_at(self, directory: str) -> None:
        self._weights_path = os.path.join(directory, "latest.weights.h5")
        self._training_metadata_path = os.path.join(directory, "training_metadata.json")

    def _take_lock(self) -> None:
        """Locks backup_dir for this run, or raises `BackupError` if another run has it."""
        os.makedirs(self.backup_dir, exist_ok=True)
        key = os.path.realpath(self.backup_dir)
        owner, lock = _HELD.get(key, (None, None))
        if lock is not None and lock.held and (
                owner is threading.current_thread() or not owner.is_alive()):
            # This thread's earlier `fit` raised before `on_train_end`: it is over.
            self._lock = lock
        else:
            lock = _io.FileLock(os.path.join(self.backup_dir, _LOCK))
            try:
                lock.acquire()
            except _io.LockedError:
                holder = lock.holder()
                raise BackupError(
                    f"The backup directory {self.backup_dir!r} is in use by another run "
                    f"({holder or 'its lock'} holds {lock.path!r}); wait for it to finish, "
                    "or give this run another directory.") from None
            self._lock = lock
        _HELD[key] = (threading.current_thread(), self._lock)

    def _release_lock(self) -> None:
        if self._lock is None:
            return
        key = os.path.realpath(self.backup_dir)
        if _HELD.get(key, (None, None))[1] is self._lock:
            del _HELD[key]
            self._lock.release()
        self._lock = None

    def _remove_torn(self, keep: str | None) -> None:
        """Removes what killed saves left: their backup directories and swap links."""
        for name in os.listdir(self.backup_dir):
            path = os.path.join(self.backup_dir, name)
            if _BACKUP_NAME.match(name) and name != keep:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
            elif _LINK_NAME.match(name) and os.path.islink(path):
                os.remove(path)

    def _restore(self, name: str) -> None:
        self._point_at(os.path.join(self.backup_dir, name))
        metadata = self._training_metadata_path
        try:
            with open(metadata, encoding="utf-8") as f:
                epoch = json.load(f)["epoch"]
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise ValueError(f"'epoch' is {epoch!r}, not an integer >= 0")
        except FileNotFoundError:
            raise self._error(f"The backup metadata {metadata!r} is missing") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise self._error(
                f"The backup metadata {metadata!r} cannot be read ({_one_line(e)})") from None
        if not os.path.isfile(self._weights_path):
            raise self._error(f"The backup weights {self._weights_path!r} are missing")
        try:
            self._load_model()
        except Exception as e:
            raise self._error(f"The backup weights {self._weights_path!r} cannot be loaded "
                              f"({_one_line(e)})") from None
        self._current_epoch = epoch
        self.model._initial_epoch = epoch

    # ----------------------------------------------------------- callbacks

    def on_train_begin(self, logs=None):
        if self.write:
            self._take_lock()
        try:
            name = self._latest_name() if os.path.isdir(self.backup_dir) else None
            if self.write:
                self._remove_torn(keep=name)
            if name is not None:
                self._restore(name)
        except BaseException:
            self._release_lock()
            raise

    def _save_model(self):
        if not self.write:
            scratch = tempfile.mkdtemp(prefix="tfmp-backup-")
            try:
                self.model.save_weights(os.path.join(scratch, "scratch.weights.h5"))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return
        os.makedirs(self.backup_dir, exist_ok=True)
        previous = self._latest_name()
        new = tempfile.mkdtemp(prefix="backup-", dir=self.backup_dir)
        try:
            self._point_at(new)
            self.model.save_weights(self._weights_path, overwrite=True)
            with open(self._training_metadata_path, "w", encoding="utf-8") as f:
                json.dump({"epoch": self._current_epoch, "batch": self._last_batch_seen}, f)
            _io.fsync_tree(new)  # Files and directory on disk before the swap.
            link = os.path.join(self.backup_dir, f".{self._LATEST}-{os.getpid()}")
            if os.path.islink(link):
                os.remove(link)
            os.symlink(os.path.basename(new), link)
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        os.replace(link, os.path.join(self.backup_dir, self._LATEST))  # The atomic step.
        _io.fsync_dir(self.backup_dir)
        if previous and previous != os.path.basename(new):
            shutil.rmtree(os.path.join(self.backup_dir, previous), ignore_errors=True)

    def on_train_end(self, logs=None):
        try:
            if self.write and self.delete_checkpoint and os.path.isdir(self.backup_dir):
                self._delete_backups()
        finally:
            self._release_lock()

    def _delete_backups(self) -> None:
        """Removes tfmp's entries of backup_dir, then backup_dir itself if it is empty."""
        self._remove_torn(keep=None)
        for name in (self._LATEST, _LOCK):
            path = os.path.join(self.backup_dir, name)
            if os.path.islink(path) or os.path.isfile(path):
                os.remove(path)
        try:
            os.rmdir(self.backup_dir)
        except OSError:
            pass  # Not empty: someone else's files are in it.
