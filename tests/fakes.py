"""Fakes for unit tests of one class: frames (blank, or rendered scenes), a decoder, a detector and a Kafka
producer."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import CollectorRegistry

from pipeline.analytics.zones import ZoneEvent
from pipeline.config import KafkaConfig, PipelineConfig, SnapshotConfig, parse_config
from pipeline.frames import Detections, Frame, FrameResult
from pipeline.ledger import NO_RUN, FrameLedger
from pipeline.ops.health import Heartbeats
from pipeline.ops.metrics import DROP_REASONS, PipelineMetrics
from pipeline.publishing.building import MessageBuilder
from pipeline.publishing.kafka_client import Producer
from pipeline.publishing.publisher import KafkaPublisher
from pipeline.publishing.spool import OutgoingMessage
from pipeline.tools.synth.world import SceneSpec, render_scene


def make_frame(stream_id: str, frame_id: int, width: int = 32, height: int = 24) -> Frame:
    return Frame(
        stream_id=stream_id,
        frame_id=frame_id,
        pts_ms=frame_id * 100.0,
        captured_at=datetime.now(timezone.utc),
        captured_monotonic=time.monotonic(),
        image=np.zeros((height, width, 3), np.uint8),
    )


def scene_frames(width: int, height: int, count: int, seed: int) -> list[Frame]:
    """Frames of the synthetic shapes world, which the bundled model detects."""
    scene = render_scene(SceneSpec(width=width, height=height, n_frames=count, seed=seed))
    return [replace(make_frame(f"s{seed}", index), image=image) for index, (image, _) in enumerate(scene)]


def make_result(frame: Frame) -> FrameResult:
    return FrameResult(frame=frame, task="detect", detections=Detections.empty(), labels={})


class FakeSource:
    """Gives `frames` images then fails or ends; `open_results` scripts failed connection attempts."""

    def __init__(self, frames: int, open_results: Sequence[bool] = (True,), fps: float = 10.0) -> None:
        self._frames = frames
        self._open_results = list(open_results)
        self._fps = fps
        self._read = 0
        self.opened = 0

    def open(self) -> bool:
        result = self._open_results.pop(0) if self._open_results else True
        self.opened += 1
        return result

    def read(self) -> npt.NDArray[np.uint8] | None:
        if self._read >= self._frames:
            return None
        self._read += 1
        return np.full((24, 32, 3), self._read % 255, np.uint8)

    def position_ms(self) -> float | None:
        return (self._read - 1) * 1000 / self._fps

    def frame_rate(self) -> float | None:
        return self._fps

    def close(self) -> None:
        self._read = 0


class FakeFuture:
    """Like kafka-python's future: a callback added after completion runs at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Any] = []
        self._errbacks: list[Any] = []
        self._outcome: tuple[bool, Any] | None = None

    def add_callback(self, fn: Any, *args: Any) -> FakeFuture:
        return self._add(True, fn, args)

    def add_errback(self, fn: Any, *args: Any) -> FakeFuture:
        return self._add(False, fn, args)

    def _add(self, on_success: bool, fn: Any, args: tuple[Any, ...]) -> FakeFuture:
        with self._lock:
            if self._outcome is None:
                (self._callbacks if on_success else self._errbacks).append((fn, args))
                return self
            succeeded, value = self._outcome
        if succeeded == on_success:
            fn(*args, value)
        return self

    def _complete(self, succeeded: bool, value: Any) -> None:
        with self._lock:
            self._outcome = (succeeded, value)
            waiting = self._callbacks if succeeded else self._errbacks
        for fn, args in waiting:
            fn(*args, value)

    def succeed(self) -> None:
        self._complete(True, object())

    def fail(self, error: Exception) -> None:
        self._complete(False, error)


class FakeProducer:
    """Acknowledges at once unless `available` is cleared; then every send fails like a dead broker."""

    def __init__(self, available: threading.Event) -> None:
        self.available = available
        self.sent: list[tuple[bytes, bytes]] = []
        self.closed = False

    def send(self, topic: str, value: bytes, key: bytes, headers: list[tuple[str, bytes]]) -> FakeFuture:
        future = FakeFuture()
        if not self.available.is_set():
            raise TimeoutError("metadata not available")
        self.sent.append((key, value))
        threading.Timer(0.001, future.succeed).start()
        return future

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


class GarbageThenGoodSource(FakeSource):
    """A decoder that starts with `garbage` unusable frames, like a stream joining between key frames."""

    def __init__(self, garbage: int, frames: int) -> None:
        super().__init__(frames=frames)
        self._garbage = garbage

    def read(self) -> npt.NDArray[np.uint8] | None:
        from pipeline.sources.source import InvalidFrame

        if self._garbage > 0:
            self._garbage -= 1
            raise InvalidFrame("no key frame yet")
        return super().read()


class Stages:
    """What every stage is built with, fresh for one test: a registry, its metrics, heartbeats and a ledger."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics = PipelineMetrics(self.registry)
        self.heartbeats = Heartbeats(self.metrics)
        self.ledger = FrameLedger(self.metrics)
        self.runs: dict[str, int] = {}

    def add_stream(self, stream_id: str) -> int:
        self.runs[stream_id] = self.ledger.add_stream(stream_id)
        return self.runs[stream_id]

    def frame(self, stream_id: str, frame_id: int, width: int = 32, height: int = 24) -> Frame:
        """A frame of a stream added here, read (for the ledger) as a reader would."""
        run = self.runs.get(stream_id) or self.add_stream(stream_id)
        frame = replace(make_frame(stream_id, frame_id, width, height), run=run)
        self.ledger.read(frame.ticket)
        return frame

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def dropped(self, stream_id: str, reason: str) -> float:
        return self.value("vap_frames_dropped_total", stream=stream_id, reason=reason)

    def assert_settled(self, *stream_ids: str) -> None:
        """Every frame read ended exactly once: published or dropped, and the metrics say the same."""
        for stream_id in stream_ids:
            totals = self.ledger.totals(stream_id)
            assert totals is not None
            assert totals.in_flight == 0, f"{stream_id}: {totals}"
            assert totals.read == totals.published + totals.dropped, f"{stream_id}: {totals}"
            dropped = sum(self.dropped(stream_id, reason) for reason in DROP_REASONS)
            assert self.value("vap_frames_read_total", stream=stream_id) == totals.read
            assert self.value("vap_frames_processed_total", stream=stream_id) == totals.published
            assert dropped == totals.dropped
        assert self.ledger.double_outcomes == 0


class MessageFeed:
    """Builds results and zone events into messages as the analytics stage does, and hands them to a
    publisher: for tests of the publisher alone. A frame of no stream yet is read into `stages`' ledger
    first, as a reader would, so that its fate is counted."""

    def __init__(self, stages: Stages, publish: Callable[[list[OutgoingMessage]], None],
                 snapshots: SnapshotConfig | None = None) -> None:
        self._stages = stages
        self._publish = publish
        self._builder = MessageBuilder("test-model", snapshots or SnapshotConfig())

    def submit(self, item: FrameResult | ZoneEvent) -> None:
        if isinstance(item, ZoneEvent):
            self._publish([self._builder.event_message(item, None)])
            return
        frame = item.frame
        if frame.run == NO_RUN:
            frame = self._stages.frame(frame.stream_id, frame.frame_id)
            item = replace(item, frame=replace(item.frame, run=frame.run))
        series = self._stages.ledger.series(frame.stream_id, frame.run)
        self._publish([self._builder.frame_message(item, series)])


class FedPublisher:
    """A started publisher with a `MessageFeed` in front, so a test submits results and events as such."""

    def __init__(self, stages: Stages, publisher: KafkaPublisher) -> None:
        self.stages = stages
        self.publisher = publisher
        self._feed = MessageFeed(stages, publisher.submit)

    def submit(self, item: FrameResult | ZoneEvent) -> None:
        self._feed.submit(item)

    def backlog(self) -> int:
        return self.publisher.backlog()

    def stop(self, flush_timeout_s: float) -> None:
        self.publisher.stop(flush_timeout_s)

    def join(self, timeout: float) -> bool:
        return self.publisher.join(timeout)


class InstantDetector:
    """A model that finds nothing; `loaded` and `release` let a test hold its loading or a batch."""

    name = "instant"
    task = "detect"
    device = "cpu"
    runtime = "python"
    labels = {0: "marker"}

    def __init__(self, release: threading.Event | None = None) -> None:
        self._release = release
        self.holding = threading.Event()
        self.held = 0

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        pass

    def submit(self, frames: Sequence[Frame]) -> Sequence[Frame]:
        return frames

    def collect(self, frames: Sequence[Frame]) -> list[FrameResult]:
        if self._release is not None and not self._release.is_set():
            self.held = len(frames)
            self.holding.set()
            self._release.wait(30)
        return [FrameResult(frame=frame, task=self.task, detections=Detections.empty(), labels=self.labels)
                for frame in frames]

    def close(self) -> None:
        pass


def config_with(streams: list[dict[str, Any]]) -> PipelineConfig:
    return parse_config({
        "streams": streams,
        "model": {"warmup": False},
        "batching": {"max_batch": 4, "max_wait_ms": 10},
        "http": {"host": "127.0.0.1", "port": 0},
    })


def fake_kafka(made: list[FakeProducer] | None = None) -> Callable[[KafkaConfig], Producer]:
    available = threading.Event()
    available.set()

    def make(_config: KafkaConfig) -> Producer:
        producer = FakeProducer(available)
        if made is not None:
            made.append(producer)
        return producer

    return make


class StubCudaEvent:
    """What the detector's CUDA branch records and waits on, for running that branch's code on the CPU."""

    def __init__(self, **_: Any) -> None:
        pass

    def record(self, _stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, _end: Any) -> float:
        return 1.0


def stub_cuda_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU runs this suite: the detector's CUDA branch runs on the CPU with its events and streams stubbed."""
    import torch

    monkeypatch.setattr(torch.cuda, "Event", StubCudaEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda _device=None: None)
