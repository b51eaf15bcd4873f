"""Every frame read ends as exactly one of published or dropped{reason}: each stage is overloaded in turn,
and at the end of each run the per-stream counts add up exactly, in /metrics, /api/v1/streams and
/api/v1/status alike."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import pipeline.publishing.publisher
from pipeline.analytics.zones import StreamAnalytics, ZoneEvent
from pipeline.app import Pipeline
from pipeline.config import KafkaConfig, PipelineConfig, parse_config
from pipeline.frames import Frame, FrameResult
from pipeline.ops.metrics import DROP_REASONS
from pipeline.publishing.kafka_client import Producer
from tests.conftest import metric_value, scrape, wait_for, write_moving_box_clip
from tests.fakes import FakeFuture, FakeProducer, InstantDetector
from tests.test_control_api import call

STREAMS = ("cam-a", "cam-b")


class SlowDetector(InstantDetector):
    """Takes `seconds` per batch; with `fail_every`, fails every n-th batch."""

    def __init__(self, seconds: float = 0.0, fail_every: int = 0) -> None:
        super().__init__()
        self._seconds = seconds
        self._fail_every = fail_every
        self._batches = 0

    def collect(self, frames: Sequence[Frame]) -> list[FrameResult]:
        self._batches += 1
        time.sleep(self._seconds)
        if self._fail_every and self._batches % self._fail_every == 0:
            raise RuntimeError("the model failed on this batch")
        return super().collect(frames)


class SlowSendProducer(FakeProducer):
    """Each send takes a while, so the publisher's loop falls behind and its inbox fills."""

    def send(self, topic: str, value: bytes, key: bytes, headers: list[tuple[str, bytes]]) -> FakeFuture:
        time.sleep(0.01)
        return super().send(topic, value, key, headers)


class Overload:
    """One stage made too slow or too small, and the drop reason that shows it."""

    def __init__(self, reasons: tuple[str, ...], detector: InstantDetector, stream: dict[str, Any],
                 sections: dict[str, Any], producer: type[FakeProducer] = FakeProducer,
                 broker_down_until_read: bool = False) -> None:
        self.reasons = reasons
        self.detector = detector
        self.stream = stream
        self.sections = sections
        self.producer = producer
        self.broker_down_until_read = broker_down_until_read


PACED = {"realtime": True}  # a paced file keeps its freshest frames, as a live camera does
FAST = {"realtime": False}
OVERLOADS = {
    "reader buffer": Overload(("queue_full", "stale"), SlowDetector(0.12), {**PACED, "max_staleness_ms": 60},
                              {"batching": {"max_batch": 1, "queue_size": 1}}),
    "inference": Overload(("inference_error",), SlowDetector(fail_every=3), FAST, {}),
    "analytics": Overload(("analytics_queue_full",), SlowDetector(), {**PACED, "analytics": {"tracking": True}},
                          {"analytics": {"workers": 1, "queue_size": 1}}),
    "publisher inbox": Overload(("publish_queue_full",), SlowDetector(), FAST, {}, producer=SlowSendProducer),
    "spool": Overload(("spool_full",), SlowDetector(), FAST, {"kafka": {"spool": {"max_messages": 3}}},
                      broker_down_until_read=True),
}


def producers_for(overload: Overload, available: threading.Event) -> Callable[[KafkaConfig], Producer]:
    def make(_config: KafkaConfig) -> Producer:
        return overload.producer(available)

    return make


def slow_analytics(monkeypatch: pytest.MonkeyPatch) -> None:
    original = StreamAnalytics.process

    def slow(self: StreamAnalytics, result: FrameResult) -> tuple[FrameResult, list[ZoneEvent]]:
        time.sleep(0.1)
        return original(self, result)

    monkeypatch.setattr(StreamAnalytics, "process", slow)


def config_for(overload: Overload, clip: Path) -> PipelineConfig:
    tree: dict[str, Any] = {
        "streams": [{"id": stream_id, "url": str(clip), **overload.stream} for stream_id in STREAMS],
        "model": {"warmup": False},
        "batching": {"max_batch": 4, "max_wait_ms": 10},
        "http": {"host": "127.0.0.1", "port": 0},
    }
    for section, values in overload.sections.items():
        tree.setdefault(section, {}).update(values)
    return parse_config(tree)


def quiet(pipeline: Pipeline) -> bool:
    """Every file read to its end and every frame settled."""
    publisher = pipeline.publisher
    settled = all(totals is not None and totals.in_flight == 0
                  for totals in (pipeline.ledger.totals(stream_id) for stream_id in STREAMS))
    return pipeline.sources_exhausted() and publisher is not None and publisher.backlog() == 0 and settled


@pytest.mark.parametrize("stage", list(OVERLOADS))
def test_each_frame_read_is_published_or_dropped_once_whichever_stage_is_overloaded(
    stage: str, pipelines: list[Pipeline], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overload = OVERLOADS[stage]
    if stage == "analytics":
        slow_analytics(monkeypatch)
    if stage == "publisher inbox":
        monkeypatch.setattr(pipeline.publishing.publisher, "INBOX_MAX_BYTES", 1)
    clip = write_moving_box_clip(tmp_path / "clip.mp4", 96, 64, frames=40, fps=40.0)
    available = threading.Event()
    if not overload.broker_down_until_read:
        available.set()
    running = Pipeline(config_for(overload, clip), detector_factory=lambda _config, _device: overload.detector,
                       producer_factory=producers_for(overload, available))
    pipelines.append(running)
    running.start()
    wait_for(running.sources_exhausted, 60, "the clips were not read to their end")
    available.set()
    wait_for(lambda: quiet(running), 30, "frames stayed in flight")
    assert running.http is not None
    port = running.http.port
    metrics = scrape(port)
    _, listed = call(port, "GET", "/api/v1/streams", token=None)
    _, status = call(port, "GET", "/api/v1/status", token=None)
    by_id = {entry["id"]: entry for entry in listed}
    for stream_id in STREAMS:
        read = metric_value(metrics, "vap_frames_read_total", stream=stream_id) or 0
        published = metric_value(metrics, "vap_frames_processed_total", stream=stream_id) or 0
        dropped = {reason: metric_value(metrics, "vap_frames_dropped_total", stream=stream_id, reason=reason) or 0
                   for reason in DROP_REASONS}
        assert read == 40, f"{stream_id}: every frame of the clip is read"
        assert read == published + sum(dropped.values()), f"{stream_id}: {published} published, {dropped}"
        entry = by_id[stream_id]
        assert (entry["frames_read"], entry["frames_processed"], entry["frames_dropped"], entry["frames_in_flight"]) \
            == (read, published, sum(dropped.values()), 0), "/api/v1/streams agrees with /metrics"
    lost = sum(metric_value(metrics, "vap_frames_dropped_total", stream=stream_id, reason=reason) or 0
               for stream_id in STREAMS for reason in overload.reasons)
    assert lost > 0, f"overloading the {stage} lost nothing: the test did not overload it"
    assert status["frames_processed"] == sum(
        metric_value(metrics, "vap_frames_processed_total", stream=stream_id) or 0 for stream_id in STREAMS), \
        "/api/v1/status agrees with /metrics"
    running.stop()
    assert running.ledger.double_outcomes == 0
