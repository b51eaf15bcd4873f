"""Where a bench run's CPU time went, by the pipeline's stages (Linux only: per-thread times from /proc).

A run's CPU cores say how busy the host was; this says which stage kept it busy, which is what decides
whether a faster model, a second process or a cheaper decoder would pay off. Threads are told apart by
the names the pipeline gives them. Threads it does not name are native: the model runtime's own (OpenVINO
streams, PyTorch's pools, CUDA's) and the video decoders' helpers.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.app import Pipeline

NATIVE = "model runtime and native threads"
KAFKA_PROCESS = "Kafka client process"  # the helper processes' roles are named by `Pipeline.helper_pids`
POLYGON_PROCESSES = "polygon processes"
BENCH = "the bench itself"

_ROLES = (
    ("reader-", "readers (decode)"),
    ("infer-", "letterbox and model dispatch"),
    ("upload-copy", "letterbox and model dispatch"),
    ("finish-", "NMS, masks, polygons"),
    ("analytics-", "analytics and messages"),
    ("publisher", "publisher"),
    ("kafka-", "publisher"),
    ("snapshots", "publisher"),
    ("MainThread", BENCH),
    ("bench-", BENCH),
)
_SAMPLE_INTERVAL_S = 0.25  # a thread that ends between samples loses at most this much of its time


class StolenTime:
    """The share of this machine's CPU time its hypervisor gave to other guests over a block of time (the
    `steal` column of /proc/stat): on a shared virtual machine a run can slow down by a fifth with nothing of
    its own changed, and this tells such a run apart. None where the kernel does not report it."""

    def __init__(self) -> None:
        self._start = _cpu_ticks()

    def fraction(self) -> float | None:
        end = _cpu_ticks()
        if self._start is None or end is None:
            return None
        total = sum(end[:8]) - sum(self._start[:8])  # guest time is already counted as user time
        return (end[7] - self._start[7]) / total if total > 0 else 0.0


def _cpu_ticks() -> list[int] | None:
    try:
        fields = Path("/proc/stat").read_text(encoding="ascii").splitlines()[0].split()
    except (OSError, IndexError):
        return None
    ticks = [int(value) for value in fields[1:]]
    return ticks if fields[0] == "cpu" and len(ticks) >= 8 else None


def role_of(thread_name: str) -> str:
    return next((role for prefix, role in _ROLES if thread_name.startswith(prefix)), "other threads")


def cpu_seconds(pid: int | None = None) -> float:
    """User and system CPU time of a process, all its threads (Linux); 0 once it has gone."""
    seconds = _stat_seconds(f"/proc/{pid or 'self'}/stat")
    return 0.0 if seconds is None else seconds


def _thread_seconds(pid: int | str = "self") -> dict[int, float]:
    """CPU seconds (user and system) of each thread of a process, by thread id; empty once it has gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    found = {int(tid): _stat_seconds(f"/proc/{pid}/task/{tid}/stat") for tid in tids}
    return {tid: seconds for tid, seconds in found.items() if seconds is not None}  # None: the thread ended


def _stat_seconds(path: str) -> float | None:
    """User plus system time from a process's or thread's `stat` file; None when it has gone."""
    try:
        fields = Path(path).read_text(encoding="ascii").rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuAccount:
    """CPU seconds by stage since it was made, for this process and the pipeline's helper processes."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self._names: dict[int, str] = {}
        self._start: dict[tuple[int, int], float] = {}
        self._last: dict[tuple[int, int], float] = {}
        self._roles: dict[int, str] = {}
        self.sample()
        self._start = dict(self._last)

    def sample(self) -> None:
        self._names.update({thread.native_id: thread.name for thread in threading.enumerate()
                            if thread.native_id is not None})
        self._last.update({(os.getpid(), tid): seconds for tid, seconds in _thread_seconds().items()})
        for role, pids in self._pipeline.helper_pids.items():
            for pid in pids:
                self._roles[pid] = role
                self._last.update({(pid, tid): seconds for tid, seconds in _thread_seconds(pid).items()})

    def seconds_by_role(self) -> dict[str, float]:
        spent: dict[str, float] = {}
        for (pid, tid), seconds in self._last.items():
            if pid == os.getpid():
                name = self._names.get(tid)
                role = NATIVE if name is None else role_of(name)
            else:
                role = self._roles[pid]
            spent[role] = spent.get(role, 0.0) + seconds - self._start.get((pid, tid), 0.0)
        return dict(sorted(spent.items(), key=lambda item: -item[1]))


@contextmanager
def cpu_by_role(pipeline: Pipeline) -> Iterator[CpuAccount]:
    """Samples every quarter second while the block runs; the caller samples once more where its measurement
    ends."""
    account = CpuAccount(pipeline)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(_SAMPLE_INTERVAL_S):
            account.sample()

    sampler = threading.Thread(target=sample, name="bench-cpu", daemon=True)
    sampler.start()
    try:
        yield account
    finally:
        done.set()
        sampler.join()
