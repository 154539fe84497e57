"""Tests for tfmp/_io.py: atomic, durable writes and the inter-process lock."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import unittest
from unittest import mock

from tfmp import _io

_IO_PATH = os.path.abspath(_io.__file__)
# A child that loads tfmp/_io.py alone (no TensorFlow), takes a lock and says so.
_HOLD_LOCK = textwrap.dedent("""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("tfmp_io", sys.argv[1])
    io = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(io)
    lock = io.FileLock(sys.argv[2])
    lock.acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def hold_lock(path):
    """A child process holding the `FileLock` on `path` (once it printed "locked")."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, _IO_PATH, path],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def dead_pid():
    """The pid of a process that has exited."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


class _FsyncRecorder:
    """Records what `os.fsync` flushes and what `os.replace`/`os.rename` move, in order."""

    def __init__(self, test):
        self.events = []
        fsync, replace, rename = os.fsync, os.replace, os.rename

        def record_fsync(fd):
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            return fsync(fd)

        def record(kind, move):
            def moved(src, dst):
                self.events.append((kind, os.path.abspath(src), os.path.abspath(dst)))
                return move(src, dst)
            return moved

        for name, new in (("fsync", record_fsync), ("replace", record("replace", replace)),
                          ("rename", record("rename", rename))):
            patcher = mock.patch.object(os, name, new)
            patcher.start()
            test.addCleanup(patcher.stop)

    def index(self, event):
        return self.events.index(event)


class AtomicPathTest(unittest.TestCase):

    def tmp_dir(self):
        path = tempfile.mkdtemp(prefix="tfmp-io-test-")
        self.addCleanup(subprocess.run, ["rm", "-rf", path])
        return path

    def test_temp_path_is_a_hidden_sibling_keeping_the_name(self):
        parent = self.tmp_dir()
        tmp = _io.temp_path(os.path.join(parent, "model.keras"))
        self.assertEqual(os.path.dirname(tmp), parent)
        self.assertRegex(os.path.basename(tmp), r"^\.tmp-[0-9a-f]{8}-\d+-[0-9a-f]{8}-model\.keras$")
        self.assertNotEqual(tmp, _io.temp_path(os.path.join(parent, "model.keras")))

    def test_file_written_in_place_only_on_success(self):
        parent = self.tmp_dir()
        path = os.path.join(parent, "sub", "out.txt")
        with _io.atomic_path(path) as tmp:
            self.assertFalse(os.path.exists(path))
            with open(tmp, "w") as f:
                f.write("new")
        with open(path) as f:
            self.assertEqual(f.read(), "new")
        with self.assertRaisesRegex(OSError, "disk full"), _io.atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                f.write("torn")
            raise OSError("disk full")
        with open(path) as f:
            self.assertEqual(f.read(), "new")
        self.assertEqual(os.listdir(os.path.dirname(path)), ["out.txt"])

    def test_directory_replaces_a_previous_directory(self):
        parent = self.tmp_dir()
        path = os.path.join(parent, "export")
        for content in ("one", "two"):
            with _io.atomic_path(path) as tmp:
                os.mkdir(tmp)
                with open(os.path.join(tmp, "f"), "w") as f:
                    f.write(content)
        with open(os.path.join(path, "f")) as f:
            self.assertEqual(f.read(), "two")
        self.assertEqual(os.listdir(parent), ["export"])
        with self.assertRaisesRegex(RuntimeError, "boom"), _io.atomic_path(path) as tmp:
            os.mkdir(tmp)
            raise RuntimeError("boom")
        self.assertEqual(os.listdir(parent), ["export"])
        self.assertEqual(os.listdir(path), ["f"])

    def test_nothing_written_is_an_error(self):
        path = os.path.join(self.tmp_dir(), "out")
        with self.assertRaisesRegex(FileNotFoundError, "Nothing was written"):
            with _io.atomic_path(path):
                pass
        self.assertFalse(os.path.lexists(path))

    def test_files_and_directory_are_fsynced_around_the_rename(self):
        parent = self.tmp_dir()
        path = os.path.join(parent, "export")
        recorder = _FsyncRecorder(self)
        with _io.atomic_path(path) as tmp:
            os.makedirs(os.path.join(tmp, "variables"))
            with open(os.path.join(tmp, "variables", "v"), "w") as f:
                f.write("x")
        rename = recorder.index(("replace", tmp, path))
        for flushed in (os.path.join(tmp, "variables", "v"), os.path.join(tmp, "variables"),
                        tmp):
            self.assertLess(recorder.index(("fsync", flushed)), rename, flushed)
        self.assertGreater(recorder.index(("fsync", parent)), rename)

    def test_json_with_nan_keeps_the_previous_file(self):
        path = os.path.join(self.tmp_dir(), "report.json")
        _io.write_json_atomically(path, {"loss": 1.5})
        for bad in (float("nan"), float("inf")):
            with self.assertRaisesRegex(
                    ValueError, r"Cannot write .*report\.json.*\(NaN or inf in the data\); "
                    "nothing was written"):
                _io.write_json_atomically(path, {"loss": bad, "layers": list(range(1000))})
        with open(path) as f:
            self.assertEqual(json.load(f), {"loss": 1.5})
        self.assertEqual(os.listdir(os.path.dirname(path)), ["report.json"])
        recorder = _FsyncRecorder(self)
        _io.write_text_atomically(path, "{}")
        self.assertEqual([e[0] for e in recorder.events], ["fsync", "replace", "fsync"])
        self.assertEqual(recorder.events[-1], ("fsync", os.path.dirname(path)))


class RemoveStaleTest(unittest.TestCase):

    def tmp_dir(self):
        path = tempfile.mkdtemp(prefix="tfmp-io-test-")
        self.addCleanup(subprocess.run, ["rm", "-rf", path])
        return path

    def _sibling(self, path, kind, pid, content="x"):
        sibling = _io._sibling(path, kind, pid=pid)
        os.mkdir(sibling)
        with open(os.path.join(sibling, "f"), "w") as f:
            f.write(content)
        return sibling

    def test_only_dead_writers_temporaries_are_removed(self):
        parent = self.tmp_dir()
        path = os.path.join(parent, "m")
        dead = self._sibling(path, "tmp", dead_pid())
        live = self._sibling(path, "tmp", os.getpid())
        other_name = self._sibling(os.path.join(parent, "other"), "tmp", dead_pid())
        other_host = os.path.join(parent, f".tmp-00000000-{dead_pid()}-0123abcd-m")
        os.mkdir(other_host)
        users = os.path.join(parent, ".tmp-m")
        os.mkdir(users)
        self.assertEqual(_io.remove_stale(path), [dead])
        self.assertEqual(sorted(os.listdir(parent)), sorted(
            os.path.basename(p) for p in (live, other_name, other_host, users)))
        # The next atomic write of `m` cleans up the same way.
        dead = self._sibling(path, "tmp", dead_pid())
        with _io.atomic_path(path) as tmp:
            os.mkdir(tmp)
        self.assertFalse(os.path.exists(dead))
        self.assertTrue(os.path.isdir(live))

    def test_a_directory_moved_aside_by_a_dead_writer_is_put_back(self):
        parent = self.tmp_dir()
        path = os.path.join(parent, "m")
        aside = self._sibling(path, "old", dead_pid(), content="previous")
        self._sibling(path, "tmp", dead_pid(), content="new, complete")
        with self.assertRaises(RuntimeError), _io.atomic_path(path):
            raise RuntimeError("the next export fails too")
        self.assertEqual(os.listdir(parent), ["m"])  # Put back, not deleted.
        with open(os.path.join(path, "f")) as f:
            self.assertEqual(f.read(), "previous")
        self.assertFalse(os.path.exists(aside))
        # With `m` in place, a stale aside is a superseded copy: removed.
        superseded = self._sibling(path, "old", dead_pid())
        _io.remove_stale(path)
        self.assertFalse(os.path.exists(superseded))
        self.assertEqual(os.listdir(parent), ["m"])


class FileLockTest(unittest.TestCase):

    def setUp(self):
        super().setUp()
        fd, self.path = tempfile.mkstemp(prefix="tfmp-io-test-", suffix=".lock")
        os.close(fd)
        self.addCleanup(os.remove, self.path)

    def test_two_locks_conflict_in_one_process(self):
        first, second = _io.FileLock(self.path), _io.FileLock(self.path)
        first.acquire()
        with self.assertRaisesRegex(_io.LockedError, "locked by another process"):
            second.acquire()
        self.assertEqual(second.holder(), f"pid {os.getpid()}")
        first.release()
        with second:
            self.assertTrue(second.held)
        self.assertFalse(second.held)

    def test_another_process_holds_it_until_killed(self):
        proc = hold_lock(self.path)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        lock = _io.FileLock(self.path)
        with self.assertRaises(_io.LockedError):
            lock.acquire()
        self.assertEqual(lock.holder(), f"pid {proc.pid}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        lock.acquire()  # The dead process's lock is stale: free.
        self.assertTrue(lock.held)
        lock.release()
