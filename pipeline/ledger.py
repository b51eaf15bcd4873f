"""Where every frame ends: published, or dropped with a reason, decided in one place.

Each stage reports what became of a frame here instead of touching counters itself, so that
`read == published + dropped` holds per stream by construction: the ledger keeps the frames of each stream
that have no outcome yet, refuses a second outcome for one of them, and exports the three numbers the
design names (`vap_frames_read_total`, `vap_frames_processed_total` for published, and
`vap_frames_dropped_total{reason}`).

A stream added under an id is one *run* of it; frames carry their run (`Frame.run`). A stream removed and
added again (a reload's restart) still has frames of the old run in flight: what becomes of them counts
for the old run, whose series are no longer exported, and never for the new one. Run 0 marks frames no
stream owns (warm-up, benchmarks that call the model directly); the ledger ignores those.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

from pipeline.ops.metrics import DROP_REASONS, PipelineMetrics, StreamMetrics

log = logging.getLogger(__name__)

OUTCOMES = ("published", *DROP_REASONS)
NO_RUN = 0


@dataclass(frozen=True, slots=True)
class FrameTicket:
    """A frame's identity for the ledger; it travels with the frame's message, which holds no pixels."""

    stream_id: str
    run: int
    frame_id: int


@dataclass(frozen=True)
class FrameTotals:
    """A stream run's frames: read, published, dropped (all reasons), and read but not settled yet."""

    read: int
    published: int
    dropped: int
    in_flight: int

    def __str__(self) -> str:
        kept = " (kept in the spool for the next run)" if self.in_flight else ""
        return (f"{self.read} frame(s) read, {self.published} published, {self.dropped} dropped (see "
                f"vap_frames_dropped_total), {self.in_flight} unsettled{kept}")


class _Run:
    """One run's open frames and counts; the counters are its exported series (or unexported once retired)."""

    __slots__ = ("dropped", "open", "published", "read", "series")

    def __init__(self, series: StreamMetrics) -> None:
        self.series = series
        self.open: set[int] = set()
        self.read = 0
        self.published = 0
        self.dropped = 0


_RETIRED_RUNS_KEPT = 1024


class FrameLedger:
    """The single owner of each frame's outcome. Thread-safe; every method is a few dictionary operations."""

    def __init__(self, metrics: PipelineMetrics) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self._next_run = NO_RUN + 1
        self._current: dict[str, int] = {}
        self._runs: dict[int, _Run] = {}
        self._retired: OrderedDict[int, None] = OrderedDict()
        self._read_total = 0
        self._published_total = 0
        self._dropped_total = 0
        self._double_outcomes = 0

    def add_stream(self, stream_id: str) -> int:
        """Starts a run of `stream_id` and creates its series at zero; returns the run to stamp on its frames."""
        self._metrics.add_stream(stream_id)
        series = self._metrics.stream(stream_id)
        with self._lock:
            run = self._next_run
            self._next_run += 1
            self._current[stream_id] = run
            self._runs[run] = _Run(series)
        return run

    def remove_stream(self, stream_id: str) -> None:
        """Stops exporting the stream's series. Its frames still in flight settle into the retired run."""
        with self._lock:
            run = self._current.pop(stream_id, None)
            if run is not None:
                self._retired[run] = None
                while len(self._retired) > _RETIRED_RUNS_KEPT:
                    oldest, _ = self._retired.popitem(last=False)
                    self._runs.pop(oldest, None)
        self._metrics.remove_stream(stream_id)

    def series(self, stream_id: str, run: int) -> StreamMetrics | None:
        """The run's per-stream series (latency, detections, zones); None for run 0 or a long-forgotten run."""
        with self._lock:
            account = self._runs.get(run)
        return None if account is None else account.series

    def read(self, ticket: FrameTicket) -> None:
        with self._lock:
            account = self._runs.get(ticket.run)
            if account is None:
                return
            account.open.add(ticket.frame_id)
            account.read += 1
            self._read_total += 1
        account.series.frames_read.inc()

    def published(self, ticket: FrameTicket) -> None:
        account = self._settle(ticket)
        if account is not None:
            account.series.frames_processed.inc()

    def dropped(self, ticket: FrameTicket, reason: str) -> None:
        account = self._settle(ticket, reason)
        if account is not None:
            account.series.dropped[reason].inc()

    def read_and_dropped(self, ticket: FrameTicket, reason: str) -> None:
        """A frame lost where it was read (decode error, rate cap)."""
        self.read(ticket)
        self.dropped(ticket, reason)

    def _settle(self, ticket: FrameTicket, reason: str | None = None) -> _Run | None:
        with self._lock:
            account = self._runs.get(ticket.run)
            if account is None:
                return None
            if ticket.frame_id not in account.open:
                self._double_outcomes += 1
                first = self._double_outcomes == 1
            else:
                account.open.discard(ticket.frame_id)
                if reason is None:
                    account.published += 1
                    self._published_total += 1
                else:
                    account.dropped += 1
                    self._dropped_total += 1
                return account
        if reason == "shutdown":  # a stop that gave up on a stage races with that stage finishing after all
            log.debug("frame %d of stream %s already settled when a stop dropped it", ticket.frame_id,
                      ticket.stream_id)
        elif first:
            log.error("frame %d of stream %s was given a second outcome (%s); ignored. This is a bug in vap",
                      ticket.frame_id, ticket.stream_id, reason or "published")
        return None

    def totals(self, stream_id: str) -> FrameTotals | None:
        """The stream's current run; None for a stream not running."""
        with self._lock:
            run = self._current.get(stream_id)
            account = None if run is None else self._runs.get(run)
            if account is None:
                return None
            return FrameTotals(account.read, account.published, account.dropped, len(account.open))

    def overall(self) -> FrameTotals:
        """Every stream this process ran, removed ones included: what a stop reports."""
        with self._lock:
            return FrameTotals(self._read_total, self._published_total, self._dropped_total,
                               self._read_total - self._published_total - self._dropped_total)

    @property
    def published_total(self) -> int:
        """Frames published by every stream this process ran, removed ones included."""
        return self._published_total

    @property
    def double_outcomes(self) -> int:
        """Outcomes refused because the frame already had one; 0 unless vap has a bug."""
        return self._double_outcomes
