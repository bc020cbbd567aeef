"""Local TensorFlow clusters for tests: free ports and worker processes under TF_CONFIG.

Each worker is `python -c SCRIPT ARGS...` with `TF_CONFIG` naming its index in a cluster
of workers on 127.0.0.1; `run_workers` starts them all, waits, and returns their output.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence


def free_ports(n: int) -> list[int]:
    """n ports free on 127.0.0.1 right now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_workers(script: str, argv: Callable[[int], Sequence[str]], *, cwd: str, n: int = 2,
                pythonpath: str = "", timeout: float = 180,
                meanwhile: Callable[[], object] | None = None) -> list[str]:
    """Runs `n` workers of a cluster on 127.0.0.1 and returns their combined output.

    Args:
      script: the Python source each worker runs (`python -c script *argv(index)`).
      argv: the worker index -> its arguments.
      cwd: working directory of the workers.
      n: number of workers.
      pythonpath: prepended to PYTHONPATH (the checkout under test).
      timeout: seconds for all of them together.
      meanwhile: called after the workers start (e.g. the one-device reference run).

    Returns:
      Each worker's stdout + stderr, in index order.

    Raises:
      AssertionError: a worker exited non-zero (its output's tail in the message).
    """
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(n)]}
    procs = []
    for index in range(n):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
                   TF_CONFIG=json.dumps({"cluster": cluster,
                                         "task": {"type": "worker", "index": index}}))
        if pythonpath:
            env["PYTHONPATH"] = pythonpath + os.pathsep + os.environ.get("PYTHONPATH", "")
        procs.append(subprocess.Popen([sys.executable, "-c", script, *argv(index)], cwd=cwd,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    try:
        if meanwhile is not None:
            meanwhile()
        deadline = time.monotonic() + timeout
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for index, proc in enumerate(procs):
        assert proc.returncode == 0, f"worker {index}:\n{outputs[index][-3000:]}"
    return outputs
