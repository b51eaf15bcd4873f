"""Frame messages built in worker processes (`analytics.message_processes`), for streams without analytics.

Why: on a GPU host the inference thread waits for the interpreter's lock, and building and encoding messages
is the largest share of it (`benchmarks/README.md`, "Where the interpreter's lock goes"): 45 us of Python a
frame with detections, 12 without, and handing results to the analytics stage's lanes one at a time costs as
much again. A stream without tracking, zones or lines (the default) has nothing else to do in that stage, so
its results skip the lanes: the finisher hands a whole batch of them here, they are split between the workers
by frame, and it waits for the encoded messages on their sockets, holding no lock. What stays in the pipeline's
process is per frame: the envelope for the publisher and the stream's metrics.

Nothing depends on the workers (`pipeline.children`): a frame no worker builds (while they start, after one
failed, once the pool is closed) is built here with the same functions. Either way a batch's messages reach the
publisher together and in order, so each stream's stay in frame order.

Snapshots need the frame's pixels, which the workers do not get: the analytics stage leaves the pool off when
`kafka.snapshots` is set.

Protocol, over the socket each worker inherits:
    worker -> pipeline, once its imports are done: ("ready",)
    pipeline -> worker: ("build", model name, labels, each frame's fields, the frames' packed detections) for a
                        run of frames; answered by ("built", [per frame: (encoded message, end-to-end seconds,
                        build seconds, detections by label), or None where it could not be built])
    pipeline -> worker: ("quit",), or end of file when the pipeline goes
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from prometheus_client import Histogram

from pipeline.children import WorkerProcess, WorkerProcesses, bootstrap_for, wait_until_ready
from pipeline.frames import (
    Classification,
    Detections,
    Frame,
    FrameResult,
    frame_groups,
    pack_detections,
    unpack_detections,
)
from pipeline.ledger import FrameLedger
from pipeline.ops.metrics import StreamMetrics
from pipeline.ops.repeated_log import RepeatedErrorLog
from pipeline.publishing.building import MessageBuilder
from pipeline.publishing.messages import build_message, detections_by_label, encode
from pipeline.publishing.spool import OutgoingMessage

log = logging.getLogger(__name__)

_REPLY_S = 2.0  # a batch takes milliseconds; the stop budget gives a stage 1.5 s
_SMALLEST_PART = 16  # frames a worker is sent at least: a part costs the pipeline 20-30 us to pack and send
_WORKER_BOOTSTRAP = bootstrap_for("pipeline.publishing.message_pool")

Built = tuple[bytes, float, float, list[tuple[str, int]]]
"""A frame's encoded message, its end-to-end seconds, the seconds its building took, its detections by label."""


class MessagePool:
    """Builds batches' messages in the workers (or here) and hands them to the publisher. One caller at a time:
    a second waits for the first."""

    def __init__(self, processes: int, builder: MessageBuilder,
                 publish: Callable[[list[OutgoingMessage]], None], ledger: FrameLedger,
                 serialize_seconds: Histogram) -> None:
        self._workers = WorkerProcesses(processes, lambda: WorkerProcess(_WORKER_BOOTSTRAP), "message worker",
                                        "its frames' messages are built in the pipeline's process")
        self._processes = processes
        self._builder = builder
        self._publish = publish
        self._ledger = ledger
        self._serialize = serialize_seconds
        self._build_errors = RepeatedErrorLog(log)
        self.frames_in_workers = 0
        self.frames_here = 0

    @property
    def pids(self) -> list[int]:
        return self._workers.pids

    @property
    def replacements(self) -> int:
        """Workers that died or stopped answering and were replaced, since the pool started."""
        return self._workers.replacements

    @property
    def ready_workers(self) -> int:
        return self._workers.ready_count

    def start(self) -> None:
        """Starts the workers and waits for them (a second or so), so that they build the first batch's messages."""
        def ready() -> int:
            with self._workers.lock:
                return len(self._workers.ready())  # starts the workers, at the first call

        wait_until_ready(ready, self._processes, "message worker",
                         "messages are built in the pipeline's process until they are")

    def publish(self, results: Sequence[FrameResult]) -> None:
        """Every result ends as a message handed to the publisher, or dropped (build_error)."""
        built = self._built_in_workers(results)
        messages = []
        series: dict[int, StreamMetrics | None] = {}
        for result, made in zip(results, built, strict=True):
            frame = result.frame
            if frame.run not in series:
                series[frame.run] = self._ledger.series(frame.stream_id, frame.run)
            try:
                if made is None:
                    started = time.monotonic()
                    messages.append(self._builder.frame_message(result, series[frame.run]))
                    build_s = time.monotonic() - started
                else:
                    value, total_s, build_s, labels = made
                    messages.append(self._builder.encoded(frame, value, total_s, labels, series[frame.run]))
            except Exception:
                self._build_errors.error("stream %s: cannot build the message of frame %d; dropped", frame.stream_id,
                                         frame.frame_id, exc_info=True)
                self._ledger.dropped(frame.ticket, "build_error")
                continue
            self._serialize.observe(build_s)
        if messages:
            self._publish(messages)

    def close(self) -> None:
        """Waits for a batch in the workers, then stops them; later batches are built by their caller."""
        self._workers.close()

    def _built_in_workers(self, results: Sequence[FrameResult]) -> list[Built | None]:
        """Each frame's message as a worker built it; None for those left to the caller."""
        built: list[Built | None] = [None] * len(results)
        labels = results[0].labels
        portable = [index for index, result in enumerate(results) if _portable(result, labels)]
        if not portable:
            self.frames_here += len(results)
            return built
        with self._workers.lock:
            ready = self._workers.ready()
            if not ready:
                self.frames_here += len(results)
                return built
            for worker_index, worker, part in self._send(results, portable, ready):
                answer = self._workers.answer(worker_index, worker, _REPLY_S, _reader(len(part)))
                for index, made in zip(part, answer or [None] * len(part), strict=True):
                    built[index] = made
        in_workers = sum(made is not None for made in built)
        self.frames_in_workers += in_workers
        self.frames_here += len(results) - in_workers
        return built

    def _send(self, results: Sequence[FrameResult], portable: list[int],
              ready: list[tuple[int, WorkerProcess]]) -> list[tuple[int, WorkerProcess, list[int]]]:
        """Runs of the portable frames, at least `_SMALLEST_PART` each, sent to as many workers; returns who has
        which. A worker that cannot be written to is replaced, and its part is left to the caller."""
        parts = min(len(ready), -(-len(portable) // _SMALLEST_PART))
        groups = [(0, len(portable))] if parts == 1 else \
            frame_groups([len(results[index].detections) + 1 for index in portable], parts)
        sent = []
        for (first, end), (worker_index, worker) in zip(groups, ready, strict=False):
            part = portable[first:end]
            request = pickle.dumps(self._request([results[index] for index in part]), pickle.HIGHEST_PROTOCOL)
            try:
                worker.connection.send_bytes(request)
            except (OSError, ValueError):
                self._workers.replace(worker_index, "cannot be written to")
                continue
            sent.append((worker_index, worker, part))
        return sent

    def _request(self, results: list[FrameResult]) -> tuple[Any, ...]:
        return ("build", self._builder.model_name, results[0].labels, [frame_fields(result) for result in results],
                pack_detections([result.detections for result in results]))


def frame_fields(result: FrameResult) -> tuple[Any, ...]:
    """What a worker needs of a result besides its detections and labels, as a tuple (the capture time as seconds:
    a datetime pickles 5 times slower)."""
    frame = result.frame
    classes = [(c.class_id, c.label, c.confidence) for c in result.classes] if result.classes else None
    return (frame.stream_id, frame.frame_id, frame.pts_ms, frame.captured_at.timestamp(), frame.captured_monotonic,
            frame.width, frame.height, result.task, result.queue_ms, result.inference_ms, classes)


def result_from_fields(fields: tuple[Any, ...], detections: Detections, labels: dict[int, str]) -> FrameResult:
    """In a worker: the result `frame_fields` was taken from, with the frame's size standing in for its pixels."""
    (stream_id, frame_id, pts_ms, captured_s, captured_monotonic, width, height, task, queue_ms, inference_ms,
     classes) = fields
    frame = Frame(stream_id, frame_id, pts_ms, datetime.fromtimestamp(captured_s, timezone.utc), captured_monotonic,
                  np.empty((height, width, 0), np.uint8))
    return FrameResult(frame, task, detections, labels, tuple(Classification(*c) for c in classes or ()),
                       queue_ms, inference_ms)


def built_message(result: FrameResult, model_name: str) -> Built:
    """In a worker: a frame's message as `MessageBuilder.frame_message` builds it without a snapshot."""
    started = time.monotonic()
    total_s = started - result.frame.captured_monotonic
    message = build_message(result, model_name, datetime.now(timezone.utc), total_s * 1000)
    return encode(message), total_s, time.monotonic() - started, detections_by_label(message)


def _portable(result: FrameResult, labels: dict[int, str]) -> bool:
    """Whether a worker builds the same message from what it is sent: track ids and zones are not sent (the
    streams that have them have analytics, whose lanes build their messages), and a request carries one
    model's labels."""
    return not result.detections.track_ids and not result.zones and result.labels is labels


def _reader(frames: int) -> Callable[[tuple[Any, ...]], list[Built | None]]:
    def read(answer: tuple[Any, ...]) -> list[Built | None]:
        if answer[0] != "built" or len(answer[1]) != frames:
            raise ValueError(f"{answer[0]!r} with {len(answer[1])} frames is not an answer to {frames}")
        built: list[Built | None] = answer[1]
        return built
    return read


def build_part(model_name: str, labels: dict[int, str], fields: list[tuple[Any, ...]],
               packed: Sequence[Any]) -> list[Built | None]:
    """In a worker: the messages of a run of frames, as `MessageBuilder.frame_message` builds them without a
    snapshot. A frame whose message cannot be built is None: the pipeline builds it again, and logs why."""
    built: list[Built | None] = []
    for frame, detections in zip(fields, unpack_detections(packed), strict=True):
        try:
            built.append(built_message(result_from_fields(frame, detections, labels), model_name))
        except Exception:
            built.append(None)
    return built


def serve_descriptor(descriptor: int) -> None:
    """The worker process's entry point: build messages from the socket it inherited until told to quit or the
    pipeline goes (SIGINT and SIGTERM are ignored: `bootstrap_for`)."""
    _serve(Connection(descriptor))
    os._exit(0)


def _serve(connection: Connection) -> None:
    with contextlib.suppress(EOFError, OSError):
        connection.send(("ready",))
        while True:
            message: Any = connection.recv()
            if message[0] != "build":
                return
            try:
                answer: Any = ("built", build_part(*message[1:]))
            except Exception:
                answer = ("failed", traceback.format_exc())
            connection.send(answer)
