"""Start N tf.distribute workers on this machine, each with its own TF_CONFIG.

    python -m tools.launch_local --num_workers=2 -- \
        python -m recipes.image_classification --distribution=multi_worker --model_dir=runs/mw

Each worker gets a `TF_CONFIG` naming all workers on free loopback ports, and
its index; its output lines are prefixed with `[worker i]`. The launcher waits
for all workers and exits 0 when all succeed; as soon as one fails it stops the
others and exits with that worker's status (128 + signal for a killed worker). A bad flag
or argument, or a command that cannot be started, prints one `error:` line and exits with
status 2 (`tfmp.cli.run`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

import tfmp

_FLAGS = tfmp.cli.define_flags({
    "num_workers": (int, 2, "Worker processes to start."),
})
_GRACE = 10.0  # seconds between SIGTERM and SIGKILL when stopping workers


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_configs(num_workers: int) -> list[str]:
    """The TF_CONFIG JSON of each of `num_workers` loopback workers."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(num_workers)]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
            for i in range(num_workers)]


def _pump(index: int, stream, print_fn: Callable[[str], None]) -> None:
    for line in iter(stream.readline, ""):
        print_fn(f"[worker {index}] {line.rstrip()}")
    stream.close()


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + _GRACE
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(command: Sequence[str], num_workers: int, *,
           print_fn: Callable[[str], None] = print) -> int:
    """Runs `command` as `num_workers` workers of one cluster and waits for them.

    Args:
        command: The worker command line (every worker runs the same one).
        num_workers: Number of workers (>= 1).
        print_fn: Receives every output line, prefixed with the worker index.

    Returns:
        0 when every worker succeeded, else the first failure's exit status
        (128 + signal number for a worker killed by a signal).

    Raises:
        ValueError: for a bad `num_workers` or an empty `command`.
        OSError: when the command cannot be started.
    """
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(
            f"`num_workers` must be an integer >= 1. Received: num_workers={num_workers!r}")
    if not command:
        raise ValueError("`command` is empty: give the worker command after `--`.")
    procs, pumps = [], []
    try:
        for i, config in enumerate(tf_configs(num_workers)):
            env = dict(os.environ, TF_CONFIG=config, PYTHONUNBUFFERED="1")
            p = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, bufsize=1)
            procs.append(p)
            print_fn(f"[launcher] worker {i} pid {p.pid}")
            pump = threading.Thread(target=_pump, args=(i, p.stdout, print_fn), daemon=True)
            pump.start()
            pumps.append(pump)
        status = 0
        while status == 0:
            codes = [p.poll() for p in procs]
            failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                index, code = failed[0]
                status = 128 - code if code < 0 else code
                print_fn(f"[launcher] worker {index} failed with status {code}; "
                         "stopping the others")
            elif all(code == 0 for code in codes):
                break
            else:
                time.sleep(0.1)
        return status
    finally:
        _stop(procs)
        for pump in pumps:
            pump.join(timeout=5)


def main(argv):
    try:
        return launch(argv[1:], _FLAGS["num_workers"].value,
                      print_fn=lambda s: print(s, flush=True))
    except (ValueError, OSError) as e:  # bad arguments, or a command that does not start
        raise tfmp.cli.UsageError(str(e)) from e


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run `finally`: stop workers
    tfmp.cli.run(main)
