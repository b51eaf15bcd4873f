"""Liveness and readiness facts shared by the stages and read by /healthz and /readyz."""

from __future__ import annotations

import contextlib
import functools
import threading
import time

from prometheus_client import Gauge

from pipeline.ops.metrics import PipelineMetrics


class Heartbeats:
    """Each long-running loop beats here once per turn; a loop that stops beating is stuck, and one whose
    thread ended with an exception is dead (see `pipeline.threads.StageThread`)."""

    def __init__(self, metrics: PipelineMetrics) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self._last_beat: dict[str, float] = {}
        self._beat_at: dict[str, float] = {}
        self._gauges: dict[str, Gauge] = {}
        self._dead: dict[str, None] = {}

    def beat(self, loop_name: str, busy_for_s: float = 0.0) -> None:
        """`busy_for_s`: the loop is about to block that long by design (a camera's open or read timeout), so
        it is not stuck until that much longer has passed. Called per frame by readers and per result by the
        analytics threads, so a loop seen before only stores its two times, one dictionary store each (atomic
        under the interpreter's lock: no lock of ours to contend for), and its gauge reads them when scraped."""
        due, beat_at = time.monotonic() + busy_for_s, time.time()
        if loop_name in self._gauges:
            self._last_beat[loop_name] = due
            self._beat_at[loop_name] = beat_at
            return
        with self._lock:
            self._last_beat[loop_name] = due
            self._beat_at[loop_name] = beat_at
            gauge = self._metrics.thread_heartbeat.labels(thread=loop_name)
            gauge.set_function(functools.partial(self._beat_time, loop_name))
            self._gauges[loop_name] = gauge

    def _beat_time(self, loop_name: str) -> float:
        return self._beat_at.get(loop_name, 0.0)

    def forget(self, loop_name: str) -> None:
        with self._lock:
            self._gauges.pop(loop_name, None)
            self._last_beat.pop(loop_name, None)
            self._beat_at.pop(loop_name, None)
            with contextlib.suppress(KeyError):
                self._metrics.thread_heartbeat.remove(loop_name)

    def died(self, loop_name: str) -> None:
        with self._lock:
            self._dead[loop_name] = None

    def forget_death(self, loop_name: str) -> None:
        """The dead thread's work is gone too (its stream was removed): it no longer fails health."""
        with self._lock:
            self._dead.pop(loop_name, None)

    def dead(self) -> list[str]:
        with self._lock:
            return sorted(self._dead)

    def stuck(self, max_age_s: float) -> list[str]:
        """Loops whose last beat (plus the blocking time it announced) is older than `max_age_s`."""
        now = time.monotonic()
        with self._lock:
            beats = list(self._last_beat.items())  # one step under the interpreter's lock, whatever beats meanwhile
        return sorted(name for name, last in beats if now - last > max_age_s)
