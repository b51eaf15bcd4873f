"""Pictures on a Kafka topic for `vap dashboard`: an unannotated JPEG of every `every_n_frames`-th frame of a
stream, keyed by stream id, with the frame's id in a header, so the page draws that very frame's detections
over it.

Pictures have a lane of their own: their own producer (its own connection, buffer and batches) and thread,
and at most one waiting picture per stream. A result message never waits behind a JPEG. Pictures are never
spooled: while the broker is away a newer picture replaces the waiting one, counted as dropped, because a
person looking at a camera wants the newest picture, never a backlog of old ones.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2

from pipeline.config import KafkaConfig, SnapshotConfig
from pipeline.frames import FrameResult, host_image
from pipeline.ops.health import Heartbeats
from pipeline.ops.metrics import PipelineMetrics
from pipeline.ops.repeated_log import RepeatedErrorLog
from pipeline.publishing.kafka_client import (
    Producer,
    close_kafka_producer,
    delivery_timeout_ms,
    ensure_topic,
    kafka_client_settings,
)
from pipeline.threads import StageThread

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 32
_FIRST_RETRY_S = 1.0
_MAX_RETRY_S = 30.0
_FAILURES_BEFORE_REOPEN = 3


@dataclass(frozen=True, slots=True)
class Picture:
    stream_id: str
    frame_id: int
    jpeg: bytes


class PictureEncoder:
    """Chooses the frames that get a picture and encodes them; called on the analytics stage's threads, one
    thread per stream at a time.

    Every `every_n_frames`-th frame *processed* of a stream gets one, counted here rather than taken from the
    frame id: frame ids skip dropped frames, and a stream whose kept ids never fall on a multiple of n would
    never show a picture.
    """

    def __init__(self, config: SnapshotConfig) -> None:
        self._config = config
        self._seen: dict[str, int] = {}

    def picture(self, result: FrameResult) -> Picture | None:
        frame = result.frame
        seen = self._seen.get(frame.stream_id, 0)
        self._seen[frame.stream_id] = seen + 1
        if seen % self._config.every_n_frames:
            return None
        image = host_image(frame.image)
        scale = min(1.0, self._config.max_width / frame.width)
        if scale < 1.0:
            size = (max(1, round(frame.width * scale)), max(1, round(frame.height * scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self._config.jpeg_quality])
        if not ok:
            raise RuntimeError("OpenCV could not encode the picture as JPEG")
        return Picture(frame.stream_id, frame.frame_id, encoded.tobytes())


def snapshot_producer_settings(config: KafkaConfig) -> dict[str, object]:
    """Pictures are disposable: one acknowledgement, no idempotence, no compression (JPEG is compressed)."""
    return {
        **kafka_client_settings(config),
        "client_id": f"{config.client_id}-snapshots",
        "acks": 1,
        "enable_idempotence": False,
        "linger_ms": 5,
        "delivery_timeout_ms": delivery_timeout_ms(config),
        "max_block_ms": 1000,
        "bootstrap_timeout_ms": 2000,
        "max_request_size": 4 * 2**20,
    }


def make_snapshot_producer(config: KafkaConfig) -> Producer:
    from kafka import KafkaProducer

    assert config.snapshots.topic is not None
    if not ensure_topic(config, config.snapshots.topic):
        raise RuntimeError(f"the snapshots topic '{config.snapshots.topic}' is missing")
    producer: Producer = KafkaProducer(**snapshot_producer_settings(config))
    return producer


class SnapshotPublisher:
    """Sends pictures to `kafka.snapshots.topic` on its own thread and producer; `offer` never blocks."""

    def __init__(
        self,
        config: KafkaConfig,
        metrics: PipelineMetrics,
        heartbeats: Heartbeats,
        extra_headers: list[tuple[str, bytes]] | None = None,
        producer_factory: Callable[[KafkaConfig], Producer] = make_snapshot_producer,
    ) -> None:
        assert config.snapshots.topic is not None
        self._config = config
        self._topic = config.snapshots.topic
        self._headers = [("content-type", b"image/jpeg"), *(extra_headers or [])]
        self._outcomes = metrics.snapshot_outcomes
        self._producer_factory = producer_factory
        self._condition = threading.Condition()
        self._waiting: dict[str, Picture] = {}
        self._in_flight = 0
        self._failures = 0
        self._stopping = False
        self._errors = RepeatedErrorLog(log)
        self._thread = StageThread("snapshots", self._run, heartbeats)

    def start(self) -> None:
        self._thread.start()

    def offer(self, picture: Picture) -> None:
        with self._condition:
            if self._stopping:
                self._outcomes["dropped"].inc()
                return
            replaced = self._waiting.pop(picture.stream_id, None)
            self._waiting[picture.stream_id] = picture
            self._condition.notify_all()
        if replaced is not None:
            self._outcomes["dropped"].inc()

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()

    def join(self, timeout: float) -> bool:
        return self._thread.join(timeout)

    def _run(self) -> None:
        producer: Producer | None = None
        retry_at, retry_s = 0.0, _FIRST_RETRY_S
        try:
            while True:
                self._thread.beat()
                with self._condition:
                    if self._stopping:
                        return
                    if not self._waiting or self._in_flight >= MAX_IN_FLIGHT or time.monotonic() < retry_at:
                        self._condition.wait(0.2)
                        continue
                    if producer is not None and self._failures >= _FAILURES_BEFORE_REOPEN:
                        close_kafka_producer(producer, 0.0)
                        producer, self._failures = None, 0
                if producer is None:
                    try:
                        producer = self._producer_factory(self._config)
                        retry_s = _FIRST_RETRY_S
                    except Exception as error:
                        self._errors.error("cannot open the producer for snapshots topic '%s' (%s); retrying in "
                                           "%.0f s", self._topic, error, retry_s)
                        retry_at, retry_s = time.monotonic() + retry_s, min(retry_s * 2, _MAX_RETRY_S)
                        continue
                self._send_waiting(producer)
        finally:
            with self._condition:
                self._stopping = True
                left = len(self._waiting)
                self._waiting.clear()
            self._outcomes["dropped"].inc(left)
            close_kafka_producer(producer, 0.5)

    def _send_waiting(self, producer: Producer) -> None:
        with self._condition:
            pictures = list(self._waiting.values())
            self._waiting.clear()
            self._in_flight += len(pictures)
        for picture in pictures:
            headers = [("frame_id", str(picture.frame_id).encode()), *self._headers]
            try:
                future = producer.send(self._topic, value=picture.jpeg, key=picture.stream_id.encode(),
                                       headers=headers)
            except Exception as error:
                self._settled(False, error)
                continue
            future.add_callback(lambda _metadata: self._settled(True))
            future.add_errback(lambda error: self._settled(False, error))

    def _settled(self, sent: bool, error: BaseException | None = None) -> None:
        with self._condition:
            self._in_flight -= 1
            self._failures = 0 if sent else self._failures + 1
            self._condition.notify_all()
        if sent:
            self._outcomes["sent"].inc()
            return
        self._outcomes["failed"].inc()
        self._outcomes["dropped"].inc()
        self._errors.error("a picture for snapshots topic '%s' was not delivered (%s)", self._topic, error)
