"""Pictures for the snapshots topic: which frames get one, their size, and their lane's bounds and counts.
The real broker's side is in tests/test_dashboard_site.py."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
from prometheus_client import CollectorRegistry

from pipeline.config import KafkaConfig, SnapshotConfig
from pipeline.frames import FrameResult
from pipeline.ops.health import Heartbeats
from pipeline.ops.metrics import PipelineMetrics
from pipeline.publishing.kafka_client import Producer
from pipeline.publishing.snapshot_topic import Picture, PictureEncoder, SnapshotPublisher
from tests.conftest import wait_for
from tests.fakes import FakeProducer, make_frame, make_result


def result(stream_id: str, frame_id: int, width: int = 1280, height: int = 720) -> FrameResult:
    frame = make_frame(stream_id, frame_id, width, height)
    assert isinstance(frame.image, np.ndarray)
    frame.image[:, : width // 2] = (0, 0, 255)
    return make_result(frame)


def test_every_nth_processed_frame_gets_an_unannotated_picture_no_wider_than_max_width() -> None:
    encoder = PictureEncoder(SnapshotConfig(topic="pics", every_n_frames=3, max_width=320, jpeg_quality=70))
    frame_ids = [0, 2, 5, 6, 9, 11, 12]  # gaps: frames dropped before the model
    pictures = [encoder.picture(result("cam", frame_id)) for frame_id in frame_ids]
    chosen = [picture.frame_id for picture in pictures if picture is not None]
    assert chosen == [0, 6, 12]  # the 1st, 4th and 7th processed, though none of 0, 3, 6, 9, 12 is special
    first = pictures[0]
    assert first is not None
    image = cv2.imdecode(np.frombuffer(first.jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (180, 320, 3)
    assert image[90, 40, 2] > 200 and image[90, 280, 2] < 60  # the frame itself, nothing drawn on it


def metrics_and_heartbeats() -> tuple[PipelineMetrics, Heartbeats]:
    metrics = PipelineMetrics(CollectorRegistry())
    return metrics, Heartbeats(metrics)


def outcome(metrics: PipelineMetrics, result: str) -> float:
    return metrics.registry.get_sample_value("vap_snapshot_messages_total", {"result": result}) or 0.0


def test_while_the_broker_is_away_only_the_newest_picture_of_each_stream_waits_and_the_rest_are_counted() -> None:
    available = threading.Event()
    opened: list[FakeProducer] = []

    def factory(_config: KafkaConfig) -> Producer:
        if not available.is_set():
            raise ConnectionError("broker away")
        producer = FakeProducer(available)
        opened.append(producer)
        return producer

    metrics, heartbeats = metrics_and_heartbeats()
    config = KafkaConfig(snapshots=SnapshotConfig(topic="pics"))
    lane = SnapshotPublisher(config, metrics, heartbeats, [("worker", b"w1")], producer_factory=factory)
    lane.start()
    try:
        for frame_id in range(5):
            lane.offer(Picture("a", frame_id, b"a%d" % frame_id))
        lane.offer(Picture("b", 0, b"b0"))
        assert outcome(metrics, "dropped") == 4
        available.set()
        wait_for(lambda: opened and len(opened[0].sent) == 2, 10, "the waiting pictures were not sent")
        assert sorted(opened[0].sent) == [(b"a", b"a4"), (b"b", b"b0")]
        wait_for(lambda: outcome(metrics, "sent") == 2, 5, "sends were not counted")
    finally:
        lane.stop()
        assert lane.join(3)


def test_offering_never_blocks_while_the_broker_is_away_and_a_stop_counts_what_is_left() -> None:
    metrics, heartbeats = metrics_and_heartbeats()
    config = KafkaConfig(snapshots=SnapshotConfig(topic="pics"))
    blocked = threading.Event()

    def never(_config: KafkaConfig) -> Producer:
        blocked.wait(0.2)
        raise ConnectionError("no broker")

    lane = SnapshotPublisher(config, metrics, heartbeats, producer_factory=never)
    lane.start()
    started = time.monotonic()
    for index in range(1000):
        lane.offer(Picture(f"cam-{index % 8}", index, b"x"))
    assert time.monotonic() - started < 1.0
    lane.stop()
    assert lane.join(3)
    assert outcome(metrics, "dropped") == 1000 and outcome(metrics, "sent") == 0
