"""A small typed reader for dashboard code: parsed `vap.frame.v1` messages, with dropped frames detected.

Example, a live per-label counter::

    from collections import Counter
    from pipeline.client import ResultReader

    counts: Counter[str] = Counter()
    with ResultReader("kafka:9092", group="dashboard") as reader:
        for message in reader:
            counts.update(d.label for d in message.detections)
            if message.gap:
                print(f"{message.stream_id}: {message.gap} frame(s) dropped before {message.frame_id}")
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime
from types import TracebackType
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)


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


class FrameMessage(_Message):
    """One `vap.frame.v1` message. `gap` is filled by the reader: frames of this stream never published
    between the previous message and this one (0 for the first message seen of a stream)."""

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
    gap: int = 0


class GapTracker:
    """Counts frame ids skipped per stream; a frame id going backwards means the pipeline restarted."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def observe(self, stream_id: str, frame_id: int) -> int:
        previous = self._last.get(stream_id)
        self._last[stream_id] = frame_id
        if previous is None or frame_id <= previous:
            return 0
        return frame_id - previous - 1


def parse_message(value: bytes) -> FrameMessage:
    return FrameMessage.model_validate(orjson.loads(value))


class ResultReader:
    """Iterates parsed messages from the result topic; stops after `idle_timeout_s` without one, if set.

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
        self._gaps = GapTracker()
        self.skipped = 0

    def __iter__(self) -> Iterator[FrameMessage]:
        for record in self._consumer:
            try:
                message = parse_message(record.value)
            except (orjson.JSONDecodeError, ValidationError, TypeError) as error:
                self.skipped += 1
                reason = "not JSON" if isinstance(error, orjson.JSONDecodeError) else "not a vap.frame.v1 message"
                log.warning("skipped the record at %s[%d] offset %d: %s", record.topic, record.partition,
                            record.offset, reason)
                continue
            gap = self._gaps.observe(message.stream_id, message.frame_id)
            yield message.model_copy(update={"gap": gap}) if gap else message

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> ResultReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
