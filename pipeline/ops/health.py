"""Liveness and readiness facts shared by the stages and read by /healthz and /readyz."""

from __future__ import annotations

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
        self._gauges: dict[str, Gauge] = {}
        self._dead: dict[str, None] = {}

    def beat(self, loop_name: str, busy_for_s: float = 0.0) -> None:
        """`busy_for_s`: the loop is about to block that long by design (a camera's open or read timeout), so
        it is not stuck until that much longer has passed. Called per frame by readers, so the loop's gauge is
        looked up once, not on every beat."""
        with self._lock:
            self._last_beat[loop_name] = time.monotonic() + busy_for_s
            gauge = self._gauges.get(loop_name)
            if gauge is None:
                gauge = self._gauges[loop_name] = self._metrics.thread_heartbeat.labels(thread=loop_name)
        gauge.set(time.time())

    def forget(self, loop_name: str) -> None:
        with self._lock:
            self._last_beat.pop(loop_name, None)
            self._gauges.pop(loop_name, None)
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
            return sorted(name for name, last in self._last_beat.items() if now - last > max_age_s)
