"""Atomic, durable writes and an inter-process lock: how tfmp writes every file it keeps.

Backups, `model.keras`, SavedModel exports and audit reports are all written
the same way: into a hidden sibling `.tmp-<host>-<pid>-<random>-<name>` in the
destination's directory, fsynced (files, then directories), renamed into place,
and the directory fsynced again, so that after a crash or a power loss the
destination holds either the previous content or the new one, never a mix.
A failed write removes its temporary; one left by a killed process is removed
by the next write to the same destination, once that process is known to be
dead (same host, pid gone). A directory that replaces a previous directory
moves the previous one aside first (`.old-...-<name>`); a process killed in
between leaves it there, and the next write puts it back. Local file systems
only; the lock uses `fcntl.flock` (POSIX).

Needs the standard library only (no TensorFlow).

Example:

    with atomic_path("out/model.keras") as tmp:
        model.save(tmp)
    write_json_atomically("out/report.json", {"loss": 0.1})
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from typing import Any

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
# .tmp-<host>-<pid>-<random>-<name> (written) and .old-... (a replaced directory).
_SIBLING = re.compile(r"^\.(tmp|old)-([0-9a-f]{8})-(\d+)-[0-9a-f]{8}-(.+)$", re.DOTALL)


class LockedError(OSError):
    """Raised by `FileLock.acquire` when another holder has the lock."""


def _sibling(path: str, kind: str = "tmp", pid: int | None = None) -> str:
    parent, name = os.path.split(path)
    pid = os.getpid() if pid is None else pid
    return os.path.join(parent, f".{kind}-{_HOST}-{pid}-{secrets.token_hex(4)}-{name}")


def temp_path(path: str | os.PathLike) -> str:
    """A new hidden temporary path next to `path`, ending with `path`'s own name.

    Args:
        path: The destination.

    Returns:
        `dir/.tmp-<host>-<pid>-<random>-<name>` (nothing is created).
    """
    return _sibling(os.path.abspath(os.fspath(path)))


def _fsync(path: str, directory: bool) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # A file system without it.
            raise
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flushes a directory's entries (new, renamed or removed names) to disk.

    Args:
        path: A directory.
    """
    _fsync(os.fspath(path), directory=True)


def fsync_tree(path: str | os.PathLike) -> None:
    """Flushes a file, or every file and directory under a directory, to disk.

    Symbolic links are not followed (the directory holding them is flushed).

    Args:
        path: A file or a directory.
    """
    path = os.fspath(path)
    if os.path.islink(path):
        return
    if not os.path.isdir(path):
        _fsync(path, directory=False)
        return
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                _fsync(os.path.join(root, name), directory=False)
        _fsync(root, directory=True)


def _remove(path: str) -> None:
    """Removes a file, a symbolic link (not its target) or a directory tree, if present."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # Not a process id tfmp wrote: leave it alone.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Another user's live process.
    return True


def remove_stale(path: str | os.PathLike) -> list[str]:
    """Cleans up after writes of `path` by processes of this host that died.

    A dead writer's `.tmp-` sibling is removed. A dead writer's `.old-` sibling
    (a previous directory moved aside) is put back when `path` is missing,
    else removed. Siblings of live processes, of other hosts, and anything
    else are left alone.

    Args:
        path: The destination.

    Returns:
        The paths removed or put back.
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    if not os.path.isdir(parent):
        return []
    done = []
    for entry in sorted(os.listdir(parent)):
        match = _SIBLING.match(entry)
        if not match or match[4] != name or match[2] != _HOST or _alive(int(match[3])):
            continue
        sibling = os.path.join(parent, entry)
        if match[1] == "old" and not os.path.lexists(path):
            os.rename(sibling, path)
            fsync_dir(parent)
        else:
            _remove(sibling)
        done.append(sibling)
    return done


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary sibling path to write; on success it replaces `path`.

    The block creates a file or a directory at the yielded path (which does not
    exist yet and ends with `path`'s name, so extensions such as `.keras` or
    `.png` are kept). Then it is fsynced and renamed onto `path` (a previous
    directory is moved aside, and deleted once the new one is in place), and
    the directory is fsynced. If the block raises, the temporary is removed
    and `path` is left as it was. Creates `path`'s parent directories.

    Args:
        path: The destination file or directory.

    Yields:
        The temporary path to write.

    Example:

        with atomic_path("run/model.keras") as tmp:
            model.save(tmp)
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    remove_stale(path)
    tmp = temp_path(path)
    try:
        yield tmp
        if not os.path.lexists(tmp):
            raise FileNotFoundError(f"Nothing was written to the temporary path {tmp!r}.")
        fsync_tree(tmp)
        _replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _replace(tmp: str, path: str) -> None:
    parent = os.path.dirname(path)
    if not (os.path.isdir(path) and not os.path.islink(path)):
        os.replace(tmp, path)
        fsync_dir(parent)
        return
    aside = _sibling(path, "old")
    os.rename(path, aside)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(aside, path)  # Put the previous one back.
        raise
    fsync_dir(parent)
    _remove(aside)


def write_text_atomically(path: str | os.PathLike, text: str) -> str:
    """Writes `text` (UTF-8) to `path` atomically and durably.

    Args:
        path: The file to write.
        text: Its content.

    Returns:
        The absolute path written.
    """
    path = os.path.abspath(os.fspath(path))
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> str:
    """Writes `data` to `path` atomically and durably (a file never half-written).

    Args:
        path: The file to write.
        data: Its content.

    Returns:
        The absolute path written.
    """
    path = os.path.abspath(os.fspath(path))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def write_json_atomically(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> str:
    """Serialises `obj` as strict JSON, then writes it to `path` atomically.

    Serialising comes first, so a value JSON cannot hold (NaN, inf, an
    object) raises before anything is written, and a previous file is kept.

    Args:
        path: The file to write.
        obj: A JSON-ready value (finite numbers only).
        indent: Passed to `json.dumps`.

    Returns:
        The absolute path written.

    Raises:
        ValueError: for NaN or infinite numbers; TypeError for other values.
    """
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"Cannot write {os.fspath(path)!r} as JSON: {e} "
                         "(NaN or inf in the data); nothing was written.") from None
    return write_text_atomically(path, text + "\n")


class FileLock:
    """An exclusive lock on a file (`fcntl.flock`), held until released or the process dies.

    The kernel drops the lock when the holder exits, however it exits
    (SIGKILL included), so a lock file left by a dead process is not held.
    Two `FileLock`s on one file conflict even within one process. The lock
    file is created if missing, holds the holder's pid, and is never deleted
    here.

    Args:
        path: The lock file.

    Example:

        lock = FileLock("run/backup/.lock")
        lock.acquire()      # LockedError if another process holds it
        ...
        lock.release()
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def holder(self) -> str:
        """What the lock file says about its holder (its pid), or `""`."""
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                return f.read(100).strip()
        except OSError:
            return ""

    def acquire(self) -> None:
        """Takes the lock without waiting.

        Raises:
            LockedError: if another holder has it.
        """
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(errno.EWOULDBLOCK, "locked by another process", self.path) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Drops the lock (nothing happens if it is not held)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.release()
