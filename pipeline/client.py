"""A small typed reader for dashboard code: parsed `vap.frame.v1` messages, with dropped frames and moved or
restarted streams told apart.

Example, a live per-label counter::

    from collections import Counter
    from pipeline.client import ResultReader

    counts: Counter[str] = Counter()
    with ResultReader("kafka:9092", group="dashboard") as reader:
        for message in reader:
            counts.update(d.label for d in message.detections)
            if message.moved:  # fleet mode: another replica runs the stream now
                print(f"{message.stream_id} moved to worker {message.worker}: frame and track ids start again")
            elif message.restarted:
                print(f"{message.stream_id} restarted: frame and track ids start again")
            elif message.gap:
                print(f"{message.stream_id}: {message.gap} frame(s) dropped before {message.frame_id}")
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

WORKER_HEADER = "worker"
"""The Kafka header that names the fleet replica which published a message (absent outside fleet mode)."""


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class BoundingBox(_Message):
    x1: float
    y1: float
    x2: float
    y2: float


class Mask(_Message):
    polygon: list[tuple[float, float]]


class Detection(_Message):
    class_id: int
    label: str
    confidence: float
    bbox: BoundingBox
    track_id: int | str | None = None
    mask: Mask | None = None


class ClassScore(_Message):
    class_id: int
    label: str
    confidence: float


class ImageSize(_Message):
    width: int
    height: int


class ModelInfo(_Message):
    name: str
    task: str


class Latency(_Message):
    queue: float
    inference: float
    total: float


class ZoneCount(_Message):
    """A zone's objects inside now, or a line's crossings since the stream started, at this frame."""

    id: str
    kind: Literal["zone", "line"]
    points: list[tuple[float, float]]
    count: int


class FrameMessage(_Message):
    """One `vap.frame.v1` message, plus what the reader knows about it from outside the body.

    `worker` comes from the record's `worker` header: the fleet replica that published it, None outside fleet
    mode. The reader compares each message with the previous one of its stream:

    - `moved`: the worker changed; the new owner started the stream afresh (frame and track ids restart).
    - `restarted`: `frame_id` went backwards on the same worker (or with no worker): vap restarted the stream.
    - `gap`: frames of this stream read but never published between the previous message and this one; 0 for
      the first message seen of a stream and whenever the message `moved` or `restarted`.
    """

    schema_id: Literal["vap.frame.v1"] = Field(alias="schema")
    stream_id: str
    frame_id: int
    pts_ms: float | None
    captured_at: datetime
    published_at: datetime
    image: ImageSize
    model: ModelInfo
    latency_ms: Latency
    detections: list[Detection] = []
    classes: list[ClassScore] = []
    zones: list[ZoneCount] = []
    gap: int = 0
    worker: str | None = None
    moved: bool = False
    restarted: bool = False


@dataclass(frozen=True)
class Continuity:
    """How a message follows the previous one of its stream (all zero, False and None for the first one)."""

    gap: int = 0
    """Frame ids skipped on the same worker: frames dropped. 0 when `moved` or `restarted`."""
    moved: bool = False
    """The worker differs from the previous message's: frame ids start again, nothing was dropped."""
    restarted: bool = False
    """`frame_id` went backwards on the same worker (or with none): the stream started again there."""
    previous_worker: str | None = None
    previous_frame_id: int | None = None


class GapTracker:
    """Follows each stream's frame ids and worker, to tell a drop (frame ids skipped on one worker) from a move
    (another worker, whose frame ids start again) and from a restart (frame ids going backwards).

    Sans-I/O: feed it what arrives, in the order it arrives, per stream.
    """

    def __init__(self) -> None:
        self._last: dict[str, tuple[str | None, int]] = {}

    def follow(self, stream_id: str, frame_id: int, worker: str | None = None) -> Continuity:
        """Takes the stream's next message (`worker` from its header, None without one) and says how it follows
        the previous one."""
        previous = self._last.get(stream_id)
        self._last[stream_id] = (worker, frame_id)
        if previous is None:
            return Continuity()
        previous_worker, previous_frame_id = previous
        if worker != previous_worker:
            return Continuity(moved=True, previous_worker=previous_worker, previous_frame_id=previous_frame_id)
        if frame_id < previous_frame_id:
            return Continuity(restarted=True, previous_worker=previous_worker, previous_frame_id=previous_frame_id)
        return Continuity(gap=max(frame_id - previous_frame_id - 1, 0), previous_worker=previous_worker,
                          previous_frame_id=previous_frame_id)

    def observe(self, stream_id: str, frame_id: int, worker: str | None = None) -> int:
        """The gap alone (see `follow`): frames dropped between the stream's previous message and this one."""
        return self.follow(stream_id, frame_id, worker).gap


def worker_from_headers(headers: Iterable[tuple[str, bytes | None]] | None) -> str | None:
    """The `worker` header's value (the last one, if repeated), or None when there is none or it is empty."""
    worker: str | None = None
    for name, value in headers or ():
        if name == WORKER_HEADER:
            worker = value.decode("utf-8", "replace") if value else None
    return worker


def parse_message(value: bytes, headers: Iterable[tuple[str, bytes | None]] | None = None) -> FrameMessage:
    """A record's value as a `FrameMessage`, with `worker` from its headers (kafka-python's `record.headers`,
    confluent-kafka's `message.headers()`). `gap`, `moved` and `restarted` are left for a `GapTracker` to fill.

    Raises:
        orjson.JSONDecodeError: the value is not JSON.
        pydantic.ValidationError: it is not a `vap.frame.v1` message.
    """
    body = orjson.loads(value)
    if isinstance(body, dict):  # the reader's own fields never come from the body
        body = {**body, "gap": 0, "worker": worker_from_headers(headers), "moved": False, "restarted": False}
    return FrameMessage.model_validate(body)


_FrameKey = tuple[str | None, int, datetime]


class MessageStream:
    """What the reader does with each record, without Kafka: parse it, count it as skipped when it is not a
    `vap.frame.v1` message (it never raises for a bad record), drop it as a duplicate when the same frame was
    already read, and fill `gap`, `moved` and `restarted`.

    Delivery is at least once: a message vap kept in its spool across a restart, or resent after a broker
    outage, can arrive twice. The same frame has the same stream id, `frame_id` and `captured_at` (a restarted
    or moved stream reuses frame ids, never with the same capture time), so that triple, with the worker that
    published it, identifies it; the last `remembered` of each stream are kept.
    """

    def __init__(self, remembered: int = 1024) -> None:
        self._streams = GapTracker()
        self._seen: dict[str, tuple[set[_FrameKey], deque[_FrameKey]]] = {}
        self._remembered = remembered
        self.skipped = 0
        self.duplicates = 0

    def take(self, value: bytes | None, headers: Iterable[tuple[str, bytes | None]] | None = None,
             where: str = "a record") -> FrameMessage | None:
        try:
            message = parse_message(value if value is not None else b"", headers)
        except (orjson.JSONDecodeError, ValidationError, TypeError, ValueError) as error:
            self.skipped += 1
            reason = "not JSON" if isinstance(error, orjson.JSONDecodeError) else "not a vap.frame.v1 message"
            log.warning("skipped %s: %s", where, reason)
            return None
        if self._seen_before(message):
            self.duplicates += 1
            return None
        step = self._streams.follow(message.stream_id, message.frame_id, message.worker)
        if step.gap or step.moved or step.restarted:
            message = message.model_copy(update={"gap": step.gap, "moved": step.moved, "restarted": step.restarted})
        return message

    def _seen_before(self, message: FrameMessage) -> bool:
        seen, order = self._seen.setdefault(message.stream_id, (set(), deque()))
        key = (message.worker, message.frame_id, message.captured_at)
        if key in seen:
            return True
        seen.add(key)
        order.append(key)
        if len(order) > self._remembered:
            seen.discard(order.popleft())
        return False


class ResultReader:
    """Iterates parsed messages from the result topic; stops after `idle_timeout_s` without one, if set. Each
    message's `worker`, `moved`, `restarted` and `gap` are filled (see `FrameMessage`).

    A record that is not a `vap.frame.v1` message (another producer on the topic, a zone event) is skipped
    with a warning and counted in `skipped`: one stray record must not end a dashboard's loop.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str = "vap.frames",
        group: str | None = None,
        from_beginning: bool = False,
        idle_timeout_s: float | None = None,
        **consumer_settings: Any,
    ) -> None:
        from kafka import KafkaConsumer

        self._consumer = KafkaConsumer(
            topic,
            bootstrap_servers=bootstrap.split(","),
            group_id=group,
            auto_offset_reset="earliest" if from_beginning else "latest",
            enable_auto_commit=group is not None,
            consumer_timeout_ms=int(idle_timeout_s * 1000) if idle_timeout_s is not None else float("inf"),
            **consumer_settings,
        )
        self._stream = MessageStream()

    @property
    def skipped(self) -> int:
        return self._stream.skipped

    @property
    def duplicates(self) -> int:
        """Messages dropped because the same frame was already read (delivery is at least once)."""
        return self._stream.duplicates

    def __iter__(self) -> Iterator[FrameMessage]:
        for record in self._consumer:
            message = self._stream.take(record.value, record.headers,
                                        f"{record.topic}[{record.partition}] offset {record.offset}")
            if message is not None:
                yield message

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> ResultReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
