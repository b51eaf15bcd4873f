"""Tracking, zones and lines in worker processes (`analytics.processes`), each stream pinned to one worker.

Why: the tracker is the largest piece of Python per frame where streams are tracked. Ultralytics' ByteTrack
costs 450-500 us a frame with five objects, and a stream's analytics 550-600 us in all, under the
interpreter's lock the inference thread needs too. At 1,800 frames/s that is one to two cores of work in the
pipeline's process. With the workers, a tracked frame costs that process 174-198 us in all, against 898-975
(`benchmarks/README.md`, "Tracking, zones and lines in worker processes").

Each stream keeps its lane, and the lane's thread hands the frames waiting in it (up to `LANE_FRAMES`, in order)
to its stream's worker in one request and waits on the worker's socket, holding no lock. So a stream's frames
still reach its tracker in order, and a slow stream still holds one of the stage's threads at most. A live
camera rarely has more than one frame waiting; a file read faster than real time, or a stage that fell behind,
has several, and one round trip for them all costs both processes less per frame. The worker keeps the stream's
state (its tracker, its tracks' zones and lines), and answers with each frame's track ids, zone states, events
and occupancy, and with the frame's and events' messages, encoded as the stage would encode them
(`pipeline.publishing.message_pool`'s functions). The stage then only hands those to the publisher. With
snapshots, which need the frame's pixels, the stage builds the messages itself from the worker's analysis.
Streams share a worker: a slow stream delays the streams pinned with it by its own analytics time, and no other.

Nothing depends on the workers. A stream's `StreamAnalytics` is built in the pipeline's process and shipped to
its worker pickled; while no worker can take it (none ready yet, or its worker died or stopped answering) it
runs in the pipeline's process, and every `_MOVE_AGAIN_S` it looks for a ready worker and moves there with its
state, so its tracks carry on. Only a worker's death costs its streams their tracks: they restart under new ids
(an object inside a zone enters it again), which the log says. A dead worker is replaced at once. A frame whose
analytics raised in the worker is published without track ids or events (`analytics_error`), as in the
pipeline's process.

BoT-SORT reads each frame's pixels (its camera-motion compensation), which the workers do not get: with
`tracking.tracker: botsort` every stream's analytics stays in the pipeline's process.

Protocol, over the socket each worker inherits:
    worker -> pipeline, once its imports are done: ("ready",)
    pipeline -> worker: ("analyse", streams to forget, stream key, (the stream's pickled `StreamAnalytics`,
                        model name or None) on a stream's first request there else None, [(a frame's fields, its
                        detections as bytes), ...]); answered by a list with, for each frame in order, ("analysed",
                        track ids, zone states, events, occupancy, (the frame's message as the message workers
                        answer it, each event's message) or None), or ("failed", traceback) when its analytics
                        raised
    pipeline -> worker: ("quit",), or end of file when the pipeline goes
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import select
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from multiprocessing.connection import Connection
from typing import Any

from pipeline.analytics.tracking import TRACKERS_READING_PIXELS
from pipeline.analytics.zones import StreamAnalytics, ZoneEvent
from pipeline.children import QUIT_WAIT_S, WorkerProcess, bootstrap_for, wait_until_ready
from pipeline.config import AnalyticsConfig
from pipeline.frames import Frame, FrameResult, detections_from_bytes, detections_to_bytes
from pipeline.ops.metrics import StreamMetrics
from pipeline.publishing.building import MessageBuilder
from pipeline.publishing.message_pool import Built, built_message, frame_fields, result_from_fields
from pipeline.publishing.messages import build_event, encode
from pipeline.publishing.spool import OutgoingMessage

log = logging.getLogger(__name__)

_REPLY_S = 2.0  # a frame takes about a millisecond; a stop gives the stage a second, and the workers another
LANE_FRAMES = 8  # frames of one stream per request at most: a few milliseconds of analytics
_MOVE_AGAIN_S = 5.0  # how often a stream in the pipeline's process looks for a ready worker
_WORKER_BOOTSTRAP = bootstrap_for("pipeline.analytics.processes")

Opening = tuple[bytes, str | None]
"""A stream's `StreamAnalytics`, pickled (fresh, or as it stood in the pipeline's process), and the model's name
for its messages (None: the pipeline builds them)."""
Arguments = tuple[str, AnalyticsConfig, str, dict[int, str]]
"""What a stream's `StreamAnalytics` is built from: stream id, its analytics config, tracker, labels."""

Made = tuple[Built, list[bytes]]
"""A frame's message as a worker built it, and its events' messages."""

Analysed = tuple[FrameResult, list[ZoneEvent]]
"""A frame with its track ids and zone states, and the events it gave."""


def analyse_each(process: Callable[[FrameResult], Analysed], results: list[FrameResult]) -> list[Analysed | Exception]:
    """Each result through `process`, in order; what one raises is its outcome, and the others go on."""
    outcomes: list[Analysed | Exception] = []
    for result in results:
        try:
            outcomes.append(process(result))
        except Exception as error:
            outcomes.append(error)
    return outcomes


class _Worker(WorkerProcess):
    def __init__(self) -> None:
        super().__init__(_WORKER_BOOTSTRAP)
        self.readable = select.poll()  # made once: Connection.poll builds a selector at every call, once a frame
        self.readable.register(self.connection.fileno(), select.POLLIN)


class AnalyticsFailed(RuntimeError):
    """A stream's analytics raised in its worker; the message carries the worker's traceback."""


@dataclass(eq=False)
class _Slot:
    """One worker and what goes with it. `lock` is held for a request's round trip: one stream at a time."""

    index: int
    worker: _Worker | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    streams: int = 0
    forgotten: list[int] = field(default_factory=list)
    frames: int = 0
    requests: int = 0


class AnalyticsProcesses:
    """`analytics.processes` workers, and the streams pinned to them."""

    def __init__(self, processes: int, model_name: str | None) -> None:
        """`model_name`: the workers build the frames' messages too; None when they need the frames' pixels
        (snapshots), which the workers do not get."""
        self._model_name = model_name
        self._slots = [_Slot(index) for index in range(processes)]
        self._keys = itertools.count()
        self._assign_lock = threading.Lock()
        self._pixels_warned = False
        self.closed = False
        self.replacements = 0

    @property
    def pids(self) -> list[int]:
        return [slot.worker.process.pid for slot in self._slots if slot.worker is not None]

    @property
    def ready_workers(self) -> int:
        with self._assign_lock:
            return sum(1 for slot in self._slots if self._is_ready(slot))

    @property
    def frames_in_workers(self) -> int:
        """Frames the workers answered, failed analytics included."""
        return sum(slot.frames for slot in self._slots)

    @property
    def requests(self) -> int:
        """Round trips to the workers: fewer than frames when lanes had several waiting."""
        return sum(slot.requests for slot in self._slots)

    def start(self) -> None:
        """Starts the workers and waits for them (importing the tracker takes a worker a few seconds), so that the
        streams added at the pipeline's start find them ready."""
        for slot in self._slots:
            slot.worker = _Worker()
        wait_until_ready(lambda: self.ready_workers, len(self._slots), "analytics worker",
                         "streams added meanwhile keep their analytics in the pipeline's process until one is")

    def analysis_for(self, stream_id: str, config: AnalyticsConfig, tracker: str,
                     labels: dict[int, str]) -> StreamAnalytics | RemoteAnalytics:
        """The stream's analytics, in the worker with the fewest streams. Its `StreamAnalytics` is built here
        first: that checks the stream's config here, and it is what the worker gets, pickled."""
        local = StreamAnalytics(stream_id, config, tracker, labels)
        if tracker in TRACKERS_READING_PIXELS:
            if not self._pixels_warned:
                self._pixels_warned = True
                log.warning("analytics.processes is ignored with tracking.tracker %s: it reads each frame's pixels, "
                            "which the workers do not get", tracker)
            return local
        if self.closed:
            return local
        analysis = RemoteAnalytics(self, next(self._keys), (stream_id, config, tracker, labels), local)
        if analysis.worker_pid is None:
            log.warning("stream %s: no analytics worker is ready; its analytics runs in the pipeline's process until "
                        "one is", stream_id, extra={"stream": stream_id})
        return analysis

    @property
    def model_name(self) -> str | None:
        return self._model_name

    def home(self) -> tuple[_Slot, _Worker] | None:
        """A ready worker for a stream, the one with the fewest streams; None when none is ready."""
        with self._assign_lock:
            if self.closed:
                return None
            for slot in self._slots:
                self._revive(slot)
            ready = [slot for slot in self._slots if self._is_ready(slot)]
            if not ready:
                return None
            slot = min(ready, key=lambda candidate: candidate.streams)
            slot.streams += 1
        assert slot.worker is not None
        return slot, slot.worker

    def ask(self, slot: _Slot, worker: _Worker, request: tuple[Any, ...]) -> list[tuple[Any, ...]] | str:
        """The worker's answers, one per frame; or why there are none, once the worker is found gone (it is then
        replaced)."""
        with slot.lock:
            if slot.worker is not worker or self.closed:
                return "has stopped"
            forgotten, slot.forgotten = slot.forgotten, []
            try:
                worker.connection.send_bytes(pickle.dumps(("analyse", forgotten, *request), pickle.HIGHEST_PROTOCOL))
                if worker.readable.poll(_REPLY_S * 1000):
                    answers: list[tuple[Any, ...]] = worker.connection.recv()
                    slot.frames += len(answers)
                    slot.requests += 1
                    return answers
                why = f"did not answer within {_REPLY_S:.0f} s"
            except (EOFError, OSError, ValueError):
                why = "closed its socket"
            if slot.worker is worker:
                self._replace(slot, why)
            else:
                worker.stop(0.0)  # killed by `close` while it had this frame: reaped, and its socket closed, here
            return why

    def release(self, slot: _Slot, key: int) -> None:
        """A stream gone from its worker, by removal or fallback; its state there goes with the next request."""
        with self._assign_lock:
            slot.streams -= 1
            slot.forgotten.append(key)

    def close(self) -> None:
        """Stops the workers, each after the frame it is working on; streams still running fall back."""
        self.closed = True
        deadline = time.monotonic() + QUIT_WAIT_S
        for slot in self._slots:
            got = slot.lock.acquire(timeout=max(0.0, deadline - time.monotonic()))
            try:
                worker, slot.worker = slot.worker, None
                if worker is None:
                    continue
                if got:
                    worker.stop(max(0.0, deadline - time.monotonic()))
                else:
                    worker.process.kill()  # its stream's thread then reads the end of the socket and falls back
                    log.warning("analytics worker %d did not finish its frame in time; killed", slot.index)
            finally:
                if got:
                    slot.lock.release()

    def _replace(self, slot: _Slot, why: str) -> None:
        """Called holding the slot's lock."""
        worker = slot.worker
        if worker is None:
            return
        log.warning("analytics worker %d (pid %d) %s; replaced, and its streams go on in the pipeline's process until "
                    "the new one is ready, their tracks restarted", slot.index, worker.process.pid, why)
        worker.stop(0.0)
        slot.worker = None if self.closed else _Worker()
        self.replacements += slot.worker is not None

    def _revive(self, slot: _Slot) -> None:
        """A worker that died between its streams' frames (none of them noticed) is replaced, for streams added
        later. Called holding `_assign_lock`; a slot busy with a frame is left to that frame's round trip."""
        worker = slot.worker
        if worker is None or worker.process.poll() is None or not slot.lock.acquire(blocking=False):
            return
        try:
            if slot.worker is worker:
                self._replace(slot, f"exited with status {worker.process.returncode}")
        finally:
            slot.lock.release()

    @staticmethod
    def _is_ready(slot: _Slot) -> bool:
        """Called holding `_assign_lock`: a worker not yet ready is read from here, and only from here."""
        try:
            return slot.worker is not None and slot.worker.check_ready()
        except (EOFError, OSError):
            return False


class RemoteAnalytics:
    """One stream's analytics, fed by the stream's lane in order, a few frames at a time: in a worker, or in the
    pipeline's process while no worker can take it. It moves to a worker once one is ready, taking its state
    along (pickled), so its tracks carry on."""

    def __init__(self, pool: AnalyticsProcesses, key: int, arguments: Arguments, here: StreamAnalytics) -> None:
        self._pool = pool
        self._key = key
        self._arguments = arguments
        self._here = here
        self._here_used = False
        self._home: tuple[_Slot, _Worker] | None = None
        self._opened = False
        self._closed = False
        self._next_move = 0.0
        self._occupancy: dict[tuple[str, str], int] = {}
        self._made: deque[Made | None] = deque()
        self._move_in()

    @property
    def worker_pid(self) -> int | None:
        """The worker the stream's analytics runs in; None while it runs in the pipeline's process."""
        return None if self._home is None else self._home[1].process.pid

    def process(self, result: FrameResult) -> Analysed:
        outcome = self.process_many([result])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def process_many(self, results: list[FrameResult]) -> list[Analysed | Exception]:
        """Each frame's analysis, or what its analytics raised, in order; `take_messages` then gives each frame's
        messages in the same order."""
        self._made.clear()
        if self._home is None and time.monotonic() >= self._next_move:
            self._move_in()
        if self._home is not None:
            outcomes = self._in_worker(results, *self._home)
            if outcomes is not None:
                return outcomes
        self._here_used = True
        return analyse_each(self._here.process, results)

    def _in_worker(self, results: list[FrameResult], slot: _Slot, worker: _Worker) -> list[Analysed | Exception] | None:
        """None when the worker is gone: the stream falls back."""
        opening = None if self._opened else (pickle.dumps(self._here, pickle.HIGHEST_PROTOCOL), self._pool.model_name)
        frames = [(frame_fields(result), detections_to_bytes(result.detections)) for result in results]
        answers = self._pool.ask(slot, worker, (self._key, opening, frames))
        if isinstance(answers, str):
            self._fall_back(answers)
            return None
        outcomes: list[Analysed | Exception] = []
        made: list[Made | None] = []
        for result, answer in zip(results, answers, strict=True):
            if answer[0] == "failed":
                outcomes.append(AnalyticsFailed(f"in analytics worker {slot.index}:\n{answer[1]}"))
                made.append(None)
                continue
            _, track_ids, zones, events, self._occupancy, messages = answer
            events = [replace(event, occurred_at=result.frame.captured_at) for event in events]
            outcomes.append((replace(result, detections=replace(result.detections, track_ids=track_ids),
                                     zones=zones), events))
            made.append(messages)
        self._made.extend(made)
        analysed_there = any(not isinstance(outcome, Exception) for outcome in outcomes)
        if not self._opened and analysed_there:  # a stream none of whose frames was analysed there opens again
            self._opened = True
            if self._here_used:  # the worker has that state now; a stream falling back again starts afresh
                self._here, self._here_used = StreamAnalytics(*self._arguments), False
        return outcomes

    def take_messages(self, frame: Frame, events: list[ZoneEvent],
                      series: StreamMetrics | None) -> tuple[list[OutgoingMessage], float] | None:
        """The messages of the next frame `process_many` last analysed, as its worker built them, and the seconds that
        took; None when the pipeline is to build them (the worker could not, or does not)."""
        made = self._made.popleft() if self._made else None
        if made is None:
            return None
        (value, total_s, build_s, labels), event_values = made
        messages = [MessageBuilder.encoded(frame, value, total_s, labels, series)]
        messages += [MessageBuilder.encoded_event(event, event_value, series)
                     for event, event_value in zip(events, event_values, strict=True)]
        return messages, build_s

    def occupancy(self) -> dict[tuple[str, str], int]:
        return self._occupancy if self._home is not None else self._here.occupancy()

    def close(self) -> None:
        """The stream is gone: its state in the worker is released."""
        self._closed = True
        self._leave()

    def _move_in(self) -> None:
        self._next_move = time.monotonic() + _MOVE_AGAIN_S
        if self._closed:
            return
        self._home = self._pool.home()
        self._opened = False
        if self._home is not None and self._here_used:
            stream_id = self._arguments[0]
            log.info("stream %s: its analytics moves to analytics worker %d; its tracks carry on", stream_id,
                     self._home[0].index, extra={"stream": stream_id})

    def _leave(self) -> None:
        if self._home is not None:
            slot, self._home = self._home[0], None
            self._pool.release(slot, self._key)

    def _fall_back(self, why: str) -> None:
        stream_id = self._arguments[0]
        if not self._pool.closed:
            log.warning("stream %s: its analytics worker %s; its analytics goes on in the pipeline's process until a "
                        "worker is ready, %s", stream_id, why,
                        "its tracks restarted" if self._opened else "its tracks carrying on",
                        extra={"stream": stream_id})
        self._leave()
        self._next_move = time.monotonic() + _MOVE_AGAIN_S


def _analysed(streams: dict[int, tuple[StreamAnalytics, str | None]], key: int, opening: Opening | None,
              fields: tuple[Any, ...], detections: tuple[Any, ...]) -> tuple[Any, ...]:
    """In a worker: one frame through its stream's analytics, as `StreamAnalytics.process` does it in the
    pipeline's process (the frame's size stands in for its pixels: ByteTrack reads nothing else), then its
    messages, unless they cannot be built here (the pipeline then builds them, and logs why)."""
    if opening is not None:
        streams[key] = (pickle.loads(opening[0]), opening[1])
    analytics, model_name = streams[key]
    analysed, events = analytics.process(result_from_fields(fields, detections_from_bytes(*detections),
                                                            analytics.labels))
    made: Made | None = None
    if model_name is not None:
        with contextlib.suppress(Exception):
            now = datetime.now(timezone.utc)
            made = built_message(analysed, model_name), [encode(build_event(event, now)) for event in events]
    return "analysed", analysed.detections.track_ids, analysed.zones, events, analytics.occupancy(), made


def serve_descriptor(descriptor: int) -> None:
    """The worker process's entry point: serve the socket it inherited until told to quit or the pipeline goes
    (SIGINT and SIGTERM are ignored: `bootstrap_for`)."""
    import ultralytics.trackers.byte_tracker  # noqa: F401  (2-3 s: before "ready", not in a frame's round trip)

    _serve(Connection(descriptor))
    os._exit(0)


def _serve(connection: Connection) -> None:
    streams: dict[int, tuple[StreamAnalytics, str | None]] = {}
    with contextlib.suppress(EOFError, OSError):
        connection.send(("ready",))
        for message in _requests(connection):
            for key in message[1]:
                streams.pop(key, None)
            key, opening, frames = message[2:]
            answers: list[tuple[Any, ...]] = []
            for fields, detections in frames:
                try:
                    answers.append(_analysed(streams, key, opening, fields, detections))
                except Exception:
                    answers.append(("failed", traceback.format_exc()))
                if key in streams:
                    opening = None
            connection.send(answers)


def _requests(connection: Connection) -> Iterator[tuple[Any, ...]]:
    while True:
        message: tuple[Any, ...] = connection.recv()
        if message[0] != "analyse":
            return
        yield message
