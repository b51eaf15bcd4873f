"""The analytics stage: each stream's tracking, zones and lines, then the frame's messages.

Every stream has a lane: its own bounded queue of results. A pool of `analytics.workers` threads takes lanes
in turn, one result at a time (up to eight for a stream analysed in a worker process), and never two threads
on one lane, so a stream's results stay in order and feed its tracker in frame order. A stream whose
analytics is slow holds one thread at a time at most; the other threads go on with the other streams, so a
slow stream delays only itself.

After analytics (at once for a stream without any), the same thread builds the frame's message and its
zone events' messages and hands them to the publisher; the frame's image is released then. An analytics
step that fails costs the frame its track ids and events, not its message (`vap_analytics_errors_total`);
a message that cannot be built drops the frame (`build_error`).

A lane's bound and policy follow its stream's: live streams keep the freshest results (the oldest goes,
`analytics_queue_full`); files read as fast as possible wait, so nothing of them is lost.

With `analytics.message_processes`, the streams without analytics skip the lanes: each batch's results of
those streams are built by worker processes while the finisher that hands them over waits
(`pipeline.publishing.message_pool`). With `analytics.processes`, the streams with analytics keep their lanes,
and a lane's thread hands the frames waiting in it to its stream's worker process and waits for their track
ids, events and messages (`pipeline.analytics.processes`).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from pipeline.analytics.processes import (
    LANE_FRAMES,
    Analysed,
    AnalyticsProcesses,
    RemoteAnalytics,
    analyse_each,
)
from pipeline.analytics.zones import StreamAnalytics, ZoneEvent
from pipeline.config import AnalyticsConfig, AnalyticsStageConfig
from pipeline.frames import FrameResult
from pipeline.ledger import FrameLedger
from pipeline.ops.health import Heartbeats
from pipeline.ops.metrics import PipelineMetrics, StreamMetrics
from pipeline.ops.repeated_log import RepeatedErrorLog
from pipeline.publishing.building import MessageBuilder
from pipeline.publishing.message_pool import MessagePool
from pipeline.publishing.spool import OutgoingMessage
from pipeline.threads import StageThread

log = logging.getLogger(__name__)

_POLL_S = 0.5


class StreamAnalysis(Protocol):
    """One stream's analytics, fed its results in frame order (`StreamAnalytics`; fakes in tests)."""

    def process(self, result: FrameResult) -> tuple[FrameResult, list[ZoneEvent]]: ...

    def occupancy(self) -> dict[tuple[str, str], int]: ...


@dataclass(eq=False)
class _Lane:
    """One run of one stream. `queued`: waiting in the ready line; `busy`: a thread works on it now."""

    stream_id: str
    run: int
    capacity: int
    wait_when_full: bool
    analytics: StreamAnalysis | None
    series: StreamMetrics | None
    results: deque[FrameResult] = field(default_factory=deque)
    occupancy_keys: set[tuple[str, str]] = field(default_factory=set)
    queued: bool = False
    busy: bool = False
    retired: bool = False


class AnalyticsStage:
    """Lanes per stream run and the threads that work through them."""

    def __init__(
        self,
        config: AnalyticsStageConfig,
        builder: MessageBuilder,
        publish: Callable[[list[OutgoingMessage]], None],
        ledger: FrameLedger,
        metrics: PipelineMetrics,
        heartbeats: Heartbeats,
    ) -> None:
        self._config = config
        self._builder = builder
        self._publish = publish
        self._ledger = ledger
        self._condition = threading.Condition()
        self._lanes: dict[int, _Lane] = {}
        self._ready: deque[_Lane] = deque()
        self._waiting = 0  # results in every lane, read by the queue-depth gauge when it is scraped
        metrics.queue_depth.labels(stage="analytics").set_function(lambda: self._waiting)
        self._seconds = {stage: metrics.stage_seconds.labels(stage=stage) for stage in ("analytics", "serialize")}
        self._stopping = False
        self._analytics_errors = RepeatedErrorLog(log)
        self._build_errors = RepeatedErrorLog(log)
        self._threads = [StageThread(f"analytics-{index}", functools.partial(self._work, index), heartbeats)
                         for index in range(config.workers + config.processes)]
        self.messages = self._message_pool(config, builder, publish)
        self.processes = AnalyticsProcesses(config.processes, None if builder.needs_images else builder.model_name) \
            if config.processes else None

    def _message_pool(self, config: AnalyticsStageConfig, builder: MessageBuilder,
                      publish: Callable[[list[OutgoingMessage]], None]) -> MessagePool | None:
        if config.message_processes and builder.needs_images:
            log.warning("analytics.message_processes is ignored while kafka.snapshots is set: the message workers "
                        "do not get the frames' pixels")
        if not config.message_processes or builder.needs_images:
            return None
        return MessagePool(config.message_processes, builder, publish, self._ledger,
                           self._seconds["serialize"])

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        if self.messages is not None:
            self.messages.start()
        if self.processes is not None:
            self.processes.start()

    def new_analysis(self, stream_id: str, config: AnalyticsConfig, tracker: str,
                     labels: dict[int, str]) -> StreamAnalysis:
        """A stream's tracking, zones and lines: in a worker process when there are any, else in this one."""
        if self.processes is None:
            return StreamAnalytics(stream_id, config, tracker, labels)
        return self.processes.analysis_for(stream_id, config, tracker, labels)

    def add_stream(self, stream_id: str, run: int, analytics: StreamAnalysis | None, wait_when_full: bool) -> None:
        with self._condition:
            self._lanes[run] = _Lane(stream_id, run, self._config.queue_size, wait_when_full, analytics,
                                     self._ledger.series(stream_id, run))

    def remove_stream(self, run: int) -> None:
        """The lane works through what it holds (those frames were read and inferred; they are published),
        then goes; nothing new of this run enters it."""
        with self._condition:
            lane = self._lanes.get(run)
            if lane is not None:
                lane.retired = True
                self._forget_if_done(lane)
            self._condition.notify_all()

    def submit_batch(self, results: Sequence[FrameResult], stop: threading.Event) -> None:
        """A batch's results, in order; those of streams without analytics go to the message workers at once when
        there are any. A result that cannot be handed on is dropped (analytics_error)."""
        direct = []
        for result in results:
            lane = self._lanes.get(result.frame.run)
            if self.messages is not None and (lane is None or lane.analytics is None):
                direct.append(result)
                continue
            try:
                self.submit(result, stop)
            except Exception:
                frame = result.frame
                log.exception("stream %s: handing on the result of frame %d failed; dropped", frame.stream_id,
                              frame.frame_id, extra={"stream": frame.stream_id})
                self._ledger.dropped(frame.ticket, "analytics_error")
        if direct and self.messages is not None:
            self.messages.publish(direct)

    def submit(self, result: FrameResult, stop: threading.Event) -> None:
        """Hand a result on. Blocks only for a stream that waits (a file read as fast as possible) while its
        lane is full, until there is room or `stop` is set."""
        frame = result.frame
        overflow: FrameResult | None = None
        with self._condition:
            lane = self._lanes.get(frame.run)
            if lane is not None and not lane.retired:
                while len(lane.results) >= lane.capacity and lane.wait_when_full and not stop.is_set():
                    self._condition.wait(_POLL_S)
                if len(lane.results) >= lane.capacity:
                    overflow = lane.results.popleft() if not lane.wait_when_full else result
                if overflow is not result:
                    lane.results.append(result)
                    self._make_ready(lane)
                    self._count_waiting(0 if overflow is not None else 1)
        if overflow is not None:
            reason = "shutdown" if overflow is result else "analytics_queue_full"
            self._ledger.dropped(overflow.frame.ticket, reason)
        elif lane is None or lane.retired:
            self._process(None, [result])  # a stream removed meanwhile: published, without its analytics

    def stop(self) -> None:
        """The threads end once every lane is empty."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all([thread.join(max(0.0, deadline - time.monotonic())) for thread in self._threads])

    def is_alive(self) -> bool:
        return all(thread.is_alive() for thread in self._threads)

    def stop_within(self, deadline: float) -> None:
        """A pipeline's stop: the lanes empty until `deadline`; what is still waiting then is dropped."""
        self.stop()
        if not self.join(max(0.0, deadline - time.monotonic())):
            log.warning("the analytics stage did not empty in time")
        left = self.discard_waiting()
        if left:
            log.warning("stopping with %d frame(s) inferred but not analysed; counted as dropped (shutdown)", left)
        if self.messages is not None:
            self.messages.close()
        if self.processes is not None:
            self.processes.close()

    def drained(self) -> bool:
        with self._condition:
            return not any(lane.results or lane.busy for lane in self._lanes.values())

    def discard_waiting(self) -> int:
        """Empties every lane, for a stop whose deadline passed; the frames are dropped (shutdown)."""
        with self._condition:
            left = [result for lane in self._lanes.values() for result in lane.results]
            for lane in self._lanes.values():
                lane.results.clear()
            self._ready.clear()
            self._count_waiting(-len(left))
            self._condition.notify_all()
        for result in left:
            self._ledger.dropped(result.frame.ticket, "shutdown")
        return len(left)

    def _count_waiting(self, change: int) -> None:
        """Called holding the lock."""
        self._waiting += change

    def _make_ready(self, lane: _Lane) -> None:
        """Called holding the lock."""
        if lane.results and not lane.busy and not lane.queued:
            lane.queued = True
            self._ready.append(lane)
            self._condition.notify_all()

    def _forget_if_done(self, lane: _Lane) -> None:
        """Called holding the lock."""
        if lane.retired and not lane.results and not lane.busy:
            self._lanes.pop(lane.run, None)
            if isinstance(lane.analytics, RemoteAnalytics):
                lane.analytics.close()

    def _work(self, index: int) -> None:
        thread = self._threads[index]
        while True:
            with self._condition:
                while not self._ready:
                    if self._stopping:
                        return
                    self._condition.wait(_POLL_S)
                    thread.beat()
                lane = self._ready.popleft()
                lane.queued, lane.busy = False, True
                taken = min(len(lane.results), LANE_FRAMES if isinstance(lane.analytics, RemoteAnalytics) else 1)
                results = [lane.results.popleft() for _ in range(taken)]
                self._count_waiting(-taken)
                self._condition.notify_all()
            try:
                self._process(lane, results)
            finally:
                with self._condition:
                    lane.busy = False
                    self._make_ready(lane)
                    self._forget_if_done(lane)
            thread.beat()

    def _process(self, lane: _Lane | None, results: list[FrameResult]) -> None:
        """A lane's results in order (several only for a stream analysed in a worker): analytics, then each one's
        messages."""
        started = time.monotonic()
        analysed: list[Analysed] = [(result, []) for result in results]
        if lane is not None and lane.analytics is not None:
            analysed = self._analyse(lane, results)
            now = time.monotonic()
            for _ in results:
                self._seconds["analytics"].observe((now - started) / len(results))
            started = now
        for result, events in analysed:
            self._publish_frame(lane, result, events, started)
            started = time.monotonic()

    def _publish_frame(self, lane: _Lane | None, result: FrameResult, events: list[ZoneEvent], started: float) -> None:
        frame = result.frame
        series = lane.series if lane is not None else self._ledger.series(frame.stream_id, frame.run)
        try:
            made = lane.analytics.take_messages(frame, events, series) \
                if lane is not None and isinstance(lane.analytics, RemoteAnalytics) else None
            if made is None:
                messages = [self._builder.frame_message(result, series)]
                messages += [self._builder.event_message(event, series) for event in events]
                made = messages, time.monotonic() - started
        except Exception:
            self._build_errors.error("stream %s: cannot build the message of frame %d; dropped", frame.stream_id,
                                     frame.frame_id, exc_info=True)
            self._ledger.dropped(frame.ticket, "build_error")
            return
        self._seconds["serialize"].observe(made[1])
        self._publish(made[0])

    def _analyse(self, lane: _Lane, results: list[FrameResult]) -> list[Analysed]:
        """Tracking, zones and lines; a frame whose analytics failed goes on without them, counted."""
        analytics = lane.analytics
        assert analytics is not None
        if isinstance(analytics, RemoteAnalytics):
            try:
                outcomes = analytics.process_many(results)
            except Exception as error:
                outcomes = [error] * len(results)
        else:
            outcomes = analyse_each(analytics.process, results)
        analysed: list[Analysed] = []
        for result, outcome in zip(results, outcomes, strict=True):
            if not isinstance(outcome, Exception):
                analysed.append(outcome)
                continue
            self._analytics_errors.error("stream %s: analytics failed on frame %d; publishing it without track ids "
                                         "or events", lane.stream_id, result.frame.frame_id, exc_info=outcome)
            if lane.series is not None:
                lane.series.analytics_errors.inc()
            analysed.append((replace(result, detections=replace(result.detections, track_ids=())), []))
        self._set_occupancy(lane, analytics.occupancy())
        return analysed

    @staticmethod
    def _set_occupancy(lane: _Lane, counts: dict[tuple[str, str], int]) -> None:
        """Every zone and label the stream has reported is set, so a zone that empties goes back to 0."""
        if lane.series is None:
            return
        lane.occupancy_keys |= set(counts)
        for zone_id, label in lane.occupancy_keys:
            lane.series.occupancy(zone_id, label).set(counts.get((zone_id, label), 0))
