"""The one way vap starts a helper process (the Kafka client, the stream decoders, the polygon workers).

A fresh interpreter, not multiprocessing: fork would copy CUDA and OpenVINO thread state, and spawn re-runs
the parent's main script, which breaks any script without a main guard. Isolated (-I), so neither the
working directory (which may hold another package named `pipeline`) nor PYTHON* variables decide what it
imports; it gets the parent's sys.path instead.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from multiprocessing.connection import Connection


def start_child(bootstrap: str) -> tuple[subprocess.Popen[bytes], Connection]:
    """Run `bootstrap` (Python source) in a new interpreter and return it with the parent's end of a socket
    pair. The child gets the parent's sys.path as JSON in argv[1] and its socket's descriptor in argv[2]."""
    ours, theirs = socket.socketpair()
    paths = [path for path in sys.path if path]
    process = subprocess.Popen(
        [sys.executable, "-I", "-c", bootstrap, json.dumps(paths), str(theirs.fileno())],
        pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
    )
    theirs.close()
    return process, Connection(ours.detach())


def end_child(process: subprocess.Popen[bytes], wait_s: float) -> None:
    """Wait up to `wait_s` for a child told to quit, then kill it; reaped either way."""
    try:
        process.wait(wait_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(1.0)
