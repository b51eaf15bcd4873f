"""The one way vap starts a helper process (the Kafka client, the stream decoders, the polygon and message
workers), and the pools of workers that take parts of a batch over their sockets.

A fresh interpreter, not multiprocessing: fork would copy CUDA and OpenVINO thread state, and spawn re-runs
the parent's main script, which breaks any script without a main guard. Isolated (-I), so neither the
working directory (which may hold another package named `pipeline`) nor PYTHON* variables decide what it
imports; it gets the parent's sys.path instead.

Worker pools (`WorkerProcesses`) speed a stage up but are never needed. A pool starts its workers when first
asked for them; a part no worker can take (while they start, after one died, once the pool is closed) is done
by the caller, in the pipeline's process, the same way. A worker that dies, is not ready within `_START_S` or
does not answer in time is replaced, after a pause that doubles while its replacements die before they are
ready.

Every worker says ("ready",) once its imports are done, answers each request with one tuple, or with
("failed", traceback) when the request raised, and ends on ("quit",) or at the end of its socket.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any, Generic, Protocol, TypeVar


def bootstrap_for(module: str) -> str:
    """What a helper runs: the parent's sys.path; SIGINT and SIGTERM ignored from its first line (Ctrl-C in a
    terminal and a service manager stopping the whole group reach the helpers too, and the pipeline stops them
    itself, after flushing through them); then `module.serve_descriptor` on the socket passed down."""
    return ("import json, signal, sys; sys.path[:0] = json.loads(sys.argv[1]); "
            "signal.signal(signal.SIGINT, signal.SIG_IGN); signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"from {module} import serve_descriptor; serve_descriptor(int(sys.argv[2]))")


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


def new_inbox(name: str, size: int) -> tuple[int, mmap.mmap]:
    """Memory a helper maps too, to pass it a batch's pixels without pickling them: a memfd, whose descriptor
    `send_inbox` hands over and the caller closes once no helper needs it any more."""
    descriptor = os.memfd_create(name)
    try:
        os.ftruncate(descriptor, size)
        return descriptor, mmap.mmap(descriptor, size)
    except BaseException:
        os.close(descriptor)
        raise


def send_inbox(connection: Connection, pid: int, header: tuple[Any, ...], descriptor: int) -> None:
    """`header` (which says the size, and whatever else the helper needs to place it), then the descriptor."""
    connection.send(header)
    send_handle(connection, descriptor, pid)


def receive_inbox(connection: Connection, size: int) -> mmap.mmap:
    """The helper's side of `send_inbox`, once it has read the header."""
    descriptor = recv_handle(connection)
    try:
        return mmap.mmap(descriptor, size)
    finally:
        os.close(descriptor)


log = logging.getLogger(__name__)

_START_S = 60.0  # importing the model library takes a worker 2-3 s; one not ready by then is stuck
_FIRST_PAUSE_S = 1.0
_LONGEST_PAUSE_S = 60.0
QUIT_WAIT_S = 1.0
_READY_WAIT_S = 10.0


def wait_until_ready(ready: Callable[[], int], wanted: int, kind: str, meanwhile: str) -> None:
    """Waits up to `_READY_WAIT_S` until `ready()` counts `wanted` workers of a pool, so that the pipeline's first
    frames find them; `meanwhile` says what happens if they are late ("messages are built in ...")."""
    started = time.monotonic()
    while time.monotonic() - started < _READY_WAIT_S:
        if ready() == wanted:
            log.info("%d %s(s) ready in %.1f s", wanted, kind, time.monotonic() - started)
            return
        time.sleep(0.05)
    log.warning("the %ss were not ready within %.0f s; %s", kind, _READY_WAIT_S, meanwhile)


class RestartPause:
    """When a replaced helper's successor may start: at once the first time, then after a pause that doubles
    while successors die before they are ready, so a helper that cannot start does not spin."""

    def __init__(self) -> None:
        self.start_after = 0.0
        self._pause_s = _FIRST_PAUSE_S

    @property
    def due(self) -> bool:
        return time.monotonic() >= self.start_after

    def replaced(self) -> float:
        """The pause before the successor starts, from now."""
        pause = self._pause_s
        self.start_after = time.monotonic() + pause
        self._pause_s = min(pause * 2, _LONGEST_PAUSE_S)
        return pause

    def ready(self) -> None:
        """The helper got ready: its next replacement starts after the first pause again."""
        self._pause_s = _FIRST_PAUSE_S


class WorkerProcess:
    """A helper process and the pipeline's end of its socket."""

    def __init__(self, bootstrap: str) -> None:
        self.process, self.connection = start_child(bootstrap)
        self.started = time.monotonic()
        self.ready = False

    def check_ready(self) -> bool:
        """Whether the worker has said it is ready; raises EOFError or OSError when it is gone."""
        if not self.ready and self.connection.poll(0):
            self.ready = self.connection.recv() == ("ready",)
        return self.ready and self.process.poll() is None

    def stop(self, wait_s: float) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.connection.send(("quit",))
        end_child(self.process, wait_s)
        self.connection.close()


class HelperPool(Protocol):
    """What the pipeline's metrics and status read of a pool of helper processes of one kind."""

    @property
    def pids(self) -> list[int]: ...

    @property
    def replacements(self) -> int:
        """Workers that died or stopped answering and were replaced, since the pool was made."""
        ...


def replacements_by_role(helpers: dict[str, list[HelperPool]]) -> dict[str, int]:
    """How many helpers of each role were replaced, for the roles with any."""
    return {role: count for role, pools in helpers.items() if (count := sum(pool.replacements for pool in pools))}


W = TypeVar("W", bound=WorkerProcess)
T = TypeVar("T")


class WorkerProcesses(Generic[W]):
    """A fixed number of workers of one kind. Callers hold `lock` while they use them, so one batch at a time
    goes to the workers and `close` waits for it."""

    def __init__(self, processes: int, start: Callable[[], W], kind: str, meanwhile: str) -> None:
        """`kind` names a worker in the log ("polygon worker"); `meanwhile` says what becomes of its parts until
        it is replaced ("its batches are traced in the pipeline's process")."""
        self._workers: list[W | None] = [None] * processes
        self._start = start
        self._pauses = [RestartPause() for _ in range(processes)]
        self._kind = kind
        self._meanwhile = meanwhile
        self.lock = threading.Lock()
        self.closed = False
        self.replacements = 0

    @property
    def pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers if worker is not None]

    @property
    def ready_count(self) -> int:
        return sum(1 for worker in self._workers if worker is not None and worker.ready)

    def ready(self) -> list[tuple[int, W]]:
        """The workers that can take a part of a batch now; starts the ones that are missing and due. Called
        holding `lock`."""
        if self.closed:
            return []
        ready = []
        for index, worker in enumerate(self._workers):
            if worker is None:
                if self._pauses[index].due:
                    self._workers[index] = self._start()
                continue
            try:
                if worker.check_ready():
                    self._pauses[index].ready()
                    ready.append((index, worker))
                elif worker.process.poll() is not None:
                    self.replace(index, f"exited with status {worker.process.returncode}")
                elif not worker.ready and time.monotonic() - worker.started > _START_S:
                    self.replace(index, f"was not ready {_START_S:.0f} s after it started")
            except (EOFError, OSError):
                self.replace(index, "closed its socket")
        return ready

    def replace(self, index: int, why: str) -> None:
        worker = self._workers[index]
        if worker is None:
            return
        self._workers[index] = None
        self.replacements += 1
        pause = self._pauses[index].replaced()
        log.warning("%s %d (pid %d) %s; %s until a new one starts in %.0f s", self._kind, index, worker.process.pid,
                    why, self._meanwhile, pause)
        worker.stop(0.0)

    def answer(self, index: int, worker: W, reply_s: float, read: Callable[[tuple[Any, ...]], T]) -> T | None:
        """`read` of the worker's answer; None when it has none: a request that failed in the worker, or a worker
        that died, did not answer within `reply_s` or sent what `read` cannot read (then it is replaced)."""
        try:
            if worker.connection.poll(reply_s):
                answer = worker.connection.recv()
                if answer[0] == "failed":
                    log.warning("%s %d failed on a batch, done in the pipeline's process instead\n%s",
                                self._kind, index, answer[1])
                    return None
                return read(answer)
            why = f"did not answer within {reply_s:.0f} s"
        except (EOFError, OSError):
            why = "closed its socket"
        except Exception as error:  # an answer that does not unpickle or does not read
            why = f"sent an unreadable answer ({error})"
        self.replace(index, why)
        return None

    def close(self) -> None:
        """Waits for a batch in the workers, then stops them; later ones are done by their callers."""
        with self.lock:
            self.closed = True
            workers = [worker for worker in self._workers if worker is not None]
            self._workers = [None] * len(self._workers)
        deadline = time.monotonic() + QUIT_WAIT_S
        for worker in workers:
            worker.stop(max(0.0, deadline - time.monotonic()))
