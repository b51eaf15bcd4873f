"""Publisher accounting with a fake producer: nothing is lost without being counted."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from kafka import errors
from prometheus_client import CollectorRegistry

from pipeline.config import KafkaConfig, SnapshotConfig, SpoolConfig
from pipeline.frames import Detections, FrameResult
from pipeline.health import Heartbeats
from pipeline.kafka_process import KafkaProcessError
from pipeline.metrics import PipelineMetrics
from pipeline.publishing import DeliveryErrorKind, KafkaPublisher, Producer, delivery_error_kind
from pipeline.snapshots import SnapshotWriter
from pipeline.spool import SPOOL_FILE, OutgoingMessage, load_undelivered, save_undelivered
from tests.conftest import wait_until
from tests.fakes import FakeFuture, FakeProducer, make_frame, make_result


class Harness:
    def __init__(self, spool_max_messages: int = 100, broker_up: bool = True,
                 producer_class: type[FakeProducer] = FakeProducer, spool_dir: Path | None = None,
                 **kafka: Any) -> None:
        self.registry = CollectorRegistry()
        self.metrics = PipelineMetrics(self.registry)
        self.available = threading.Event()
        if broker_up:
            self.available.set()
        self.producers: list[FakeProducer] = []
        self._producer_class = producer_class
        config = KafkaConfig(spool=SpoolConfig(max_messages=spool_max_messages, dir=spool_dir), **kafka)
        self.publisher = KafkaPublisher(config, "test-model", self.metrics, Heartbeats(self.metrics), self._factory)

    def _factory(self, _config: KafkaConfig) -> Producer:
        producer = self._producer_class(self.available)
        self.producers.append(producer)
        return producer

    def count(self, result: str) -> float:
        return self.registry.get_sample_value("vap_kafka_messages_total", {"result": result}) or 0.0

    def sent_frame_ids(self) -> list[int]:
        return [orjson.loads(value)["frame_id"] for producer in self.producers for _, value in producer.sent]

    def sent_messages(self) -> list[dict[str, Any]]:
        return [orjson.loads(value) for producer in self.producers for _, value in producer.sent]


def mismatched_result(frame_id: int) -> FrameResult:
    """Two boxes but one confidence and class id: its message cannot be built."""
    detections = Detections(boxes_xyxy=np.zeros((2, 4), np.float32), confidences=np.ones(1, np.float32),
                            class_ids=np.zeros(1, np.int64))
    return FrameResult(frame=make_frame("cam-1", frame_id), task="detect", detections=detections, labels={0: "box"})


class RefusingProducer(FakeProducer):
    """Fails frame 2, on every try, with an error of no known kind."""

    def send(self, topic: str, value: bytes, key: bytes, headers: list[tuple[str, bytes]]) -> FakeFuture:
        if orjson.loads(value)["frame_id"] == 2:
            raise ValueError("refused for no reason Kafka gives")
        return super().send(topic, value, key, headers)


def test_every_message_is_sent_keyed_by_stream_in_order() -> None:
    harness = Harness()
    harness.publisher.start()
    for frame_id in range(20):
        harness.publisher.submit(make_result(make_frame("cam-1", frame_id)))
    assert wait_until(lambda: harness.count("sent") == 20)
    harness.publisher.stop(flush_timeout_s=2)
    assert harness.publisher.join(5)
    assert harness.sent_frame_ids() == list(range(20))
    assert {key for producer in harness.producers for key, _ in producer.sent} == {b"cam-1"}
    assert harness.count("dropped") == 0 and harness.count("failed") == 0


def test_broker_outage_spools_within_bound_and_counts_the_oldest_dropped() -> None:
    harness = Harness(spool_max_messages=10, broker_up=False)
    harness.publisher.start()
    for frame_id in range(25):
        harness.publisher.submit(make_result(make_frame("cam-1", frame_id)))
    assert wait_until(lambda: harness.count("dropped") == 15)
    assert wait_until(lambda: harness.count("failed") >= 1)
    harness.available.set()
    assert wait_until(lambda: harness.count("sent") == 10)
    harness.publisher.stop(flush_timeout_s=2)
    assert harness.publisher.join(5)
    assert sorted(harness.sent_frame_ids()) == list(range(15, 25))


def test_a_producer_that_keeps_failing_is_replaced_and_the_spool_resent() -> None:
    harness = Harness(broker_up=False)
    harness.publisher.start()
    for frame_id in range(5):
        harness.publisher.submit(make_result(make_frame("cam-1", frame_id)))
    assert wait_until(lambda: len(harness.producers) >= 2)
    harness.available.set()
    assert wait_until(lambda: harness.count("sent") == 5)
    harness.publisher.stop(flush_timeout_s=2)
    assert harness.publisher.join(5)
    assert harness.producers[0].closed
    assert harness.sent_frame_ids() == list(range(5))


def test_stop_counts_undeliverable_messages_as_dropped_within_the_deadline() -> None:
    harness = Harness(broker_up=False)
    harness.publisher.start()
    for frame_id in range(7):
        harness.publisher.submit(make_result(make_frame("cam-1", frame_id)))
    assert wait_until(lambda: harness.publisher.backlog() == 7)
    started = time.monotonic()
    harness.publisher.stop(flush_timeout_s=0.5)
    assert harness.publisher.join(5)
    assert time.monotonic() - started < 4
    assert harness.count("dropped") == 7 and harness.count("sent") == 0


def test_results_are_counted_and_spooled_while_a_slow_producer_opens() -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    may_open = threading.Event()
    opened: list[FakeProducer] = []
    up = threading.Event()
    up.set()

    def slow_factory(_config: KafkaConfig) -> Producer:
        may_open.wait(30)
        opened.append(FakeProducer(up))
        return opened[-1]

    publisher = KafkaPublisher(KafkaConfig(), "test-model", metrics, Heartbeats(metrics), slow_factory)
    publisher.start()
    for frame_id in range(5):
        publisher.submit(make_result(make_frame("cam-1", frame_id)))
    assert wait_until(lambda: registry.get_sample_value("vap_frames_processed_total", {"stream": "cam-1"}) == 5,
                      timeout_s=3), \
        "the publisher loop must not wait for the producer to open"
    assert registry.get_sample_value("vap_queue_depth", {"stage": "kafka_spool"}) == 5
    may_open.set()
    assert wait_until(lambda: registry.get_sample_value("vap_kafka_messages_total", {"result": "sent"}) == 5)
    publisher.stop(flush_timeout_s=1)
    assert publisher.join(5)
    assert opened[0].closed


def test_results_that_cannot_be_built_are_counted_dropped_and_the_publisher_goes_on(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "snapshots"
    not_a_directory.write_text("a file where the snapshot directory should be", encoding="utf-8")
    harness = Harness(snapshots=SnapshotConfig(dir=not_a_directory, every_n_frames=1))
    harness.publisher.start()
    broken = {3, 7}
    for frame_id in range(10):
        harness.publisher.submit(mismatched_result(frame_id) if frame_id in broken else make_result(
            make_frame("cam-1", frame_id)))
    assert wait_until(lambda: harness.count("sent") + harness.count("dropped") == 10)
    assert harness.publisher.is_alive()
    for frame_id in range(10, 15):
        harness.publisher.submit(make_result(make_frame("cam-1", frame_id)))
    assert wait_until(lambda: harness.count("sent") == 13), "the publisher keeps publishing after a bad result"
    harness.publisher.stop(flush_timeout_s=2)
    assert harness.publisher.join(5)
    assert harness.count("dropped") == 2 and harness.count("sent") + harness.count("dropped") == 15
    assert harness.sent_frame_ids() == [frame_id for frame_id in range(15) if frame_id not in broken]
    assert all("snapshot" not in message for message in harness.sent_messages()), \
        "a snapshot that cannot be written costs the picture, not the message"


def test_a_message_that_keeps_failing_for_no_known_reason_is_dropped_after_a_bounded_number_of_tries() -> None:
    harness = Harness(producer_class=RefusingProducer)
    harness.publisher.start()
    for frame_id in range(6):
        harness.publisher.submit(make_result(make_frame("cam-1", frame_id)))
    assert wait_until(lambda: harness.count("sent") == 5 and harness.count("dropped") == 1)
    assert harness.publisher.is_alive()
    harness.publisher.stop(flush_timeout_s=2)
    assert harness.publisher.join(5)
    assert harness.count("failed") == 5 and harness.count("dropped") == 1
    assert harness.sent_frame_ids() == [0, 1, 3, 4, 5]


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (errors.MessageSizeTooLargeError("1.2 MB"), "rejected"),
        (errors.InvalidRecordError("bad record"), "rejected"),
        (errors.TopicAuthorizationFailedError("vap.frames"), "transient"),
        (errors.KafkaTimeoutError("batch expired"), "transient"),
        (errors.KafkaConnectionError("refused"), "transient"),
        (errors.UnknownProducerIdError("broker restarted"), "transient"),
        (errors.IllegalStateError("Producer is closed forcefully."), "transient"),
        (TimeoutError("metadata not available"), "transient"),
        (KafkaProcessError("the Kafka client process exited"), "transient"),
        (KafkaProcessError("MessageSizeTooLargeError(...)", "rejected"), "rejected"),
        (errors.KafkaError("part of a batch with an invalid record"), "unexplained"),
        (ValueError("odd"), "unexplained"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_delivery_errors_are_told_apart_by_whether_a_retry_can_succeed(error: Exception,
                                                                       kind: DeliveryErrorKind) -> None:
    assert delivery_error_kind(error) == kind


def test_a_restored_spool_file_stays_on_disk_until_its_messages_are_delivered(tmp_path: Path) -> None:
    save_undelivered(tmp_path, [OutgoingMessage(b"cam-1", orjson.dumps({"frame_id": index})) for index in range(3)])
    harness = Harness(broker_up=False, spool_dir=tmp_path)
    harness.publisher.start()
    assert wait_until(lambda: harness.count("failed") >= 1)
    assert len(load_undelivered(tmp_path)) == 3, "a crash now must not lose what the last run kept"
    harness.available.set()
    assert wait_until(lambda: harness.count("sent") == 3)
    assert wait_until(lambda: not (tmp_path / SPOOL_FILE).exists())
    harness.publisher.stop(flush_timeout_s=2)
    assert harness.publisher.join(5)
    assert not (tmp_path / SPOOL_FILE).exists()
    assert harness.sent_frame_ids() == [0, 1, 2] and harness.count("dropped") == 0


class SlowAckProducer(FakeProducer):
    """Acknowledges after 50 ms, so under steady traffic something is always in flight."""

    def send(self, topic: str, value: bytes, key: bytes, headers: list[tuple[str, bytes]]) -> FakeFuture:
        future = FakeFuture()
        self.sent.append((key, value))
        threading.Timer(0.05, future.succeed).start()
        return future


def test_a_restored_spool_file_goes_once_its_own_messages_are_delivered_though_traffic_never_stops(
        tmp_path: Path) -> None:
    save_undelivered(tmp_path, [OutgoingMessage(b"cam-1", orjson.dumps({"frame_id": -1 - i})) for i in range(3)])
    harness = Harness(spool_dir=tmp_path, producer_class=SlowAckProducer)
    harness.publisher.start()
    gone_at = None
    try:
        for frame_id in range(150):  # 100 frames/s for 1.5 s
            harness.publisher.submit(make_result(make_frame("cam-1", frame_id)))
            if gone_at is None and not (tmp_path / SPOOL_FILE).exists():
                gone_at = frame_id
            time.sleep(0.01)
    finally:
        harness.publisher.stop(flush_timeout_s=2)
        assert harness.publisher.join(5)
    assert gone_at is not None and gone_at < 120, "the file stayed while new messages kept the backlog up"
    assert harness.sent_frame_ids()[:3] == [-1, -2, -3]


def test_snapshots_keep_only_the_newest_even_when_frame_ids_have_gaps(tmp_path: Path) -> None:
    stale = tmp_path / "cam" / "000000099990.jpg"
    stale.parent.mkdir()
    stale.write_bytes(b"left by a previous run")
    os.utime(stale, (1, 1))
    writer = SnapshotWriter(SnapshotConfig(dir=tmp_path, every_n_frames=10, keep_last=5))
    for frame_id in range(0, 600, 3):  # a 30 fps camera capped at 10: every third id reaches the publisher
        writer.write(make_result(make_frame("cam", frame_id)))
    kept = sorted(path.name for path in (tmp_path / "cam").iterdir())
    assert kept == [f"{frame_id:012d}.jpg" for frame_id in (450, 480, 510, 540, 570)]
