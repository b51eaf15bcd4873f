"""/healthz covers every stage thread, readers included: one that dies turns it failing, naming the thread."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

import pipeline.sources.choice
from pipeline.app import Pipeline
from pipeline.config import StreamConfig
from tests.conftest import wait_for, write_moving_box_clip
from tests.fakes import FakeSource, InstantDetector, config_with, fake_kafka
from tests.test_control_api import call


class ReaderKiller(BaseException):
    """Not an Exception: nothing in the reader catches it, as with a fault in native code."""


class DyingSource(FakeSource):
    def __init__(self, config: StreamConfig, threads: int = 0) -> None:
        super().__init__(frames=1000)
        self._dies = config.id == "doomed"

    def read(self) -> npt.NDArray[np.uint8] | None:
        if self._dies and self._read >= 3:
            raise ReaderKiller
        return super().read()


def test_a_reader_thread_that_dies_fails_healthz_until_its_stream_is_removed(
    pipelines: list[Pipeline], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline.sources.choice, "OpenCvSource", DyingSource)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)
    clip = str(write_moving_box_clip(tmp_path / "clip.mp4", 96, 64))
    running = Pipeline(config_with([{"id": "doomed", "url": clip, "loop": True},
                                    {"id": "steady", "url": clip, "loop": True}]),
                       detector_factory=lambda _config, _device: InstantDetector(), producer_factory=fake_kafka())
    pipelines.append(running)
    running.start()
    assert running.http is not None
    port = running.http.port

    def health() -> tuple[int, dict[str, object]]:
        code, body = call(port, "GET", "/healthz", token=None)
        return code, body

    wait_for(lambda: health()[0] == 503, 10, "the dead reader went unnoticed")
    _code, body = health()
    assert body["dead"] == ["reader-doomed"], body
    running.remove_stream("doomed")
    assert health()[0] == 200, "a removed stream's dead reader no longer fails health"


def test_a_loops_heartbeat_gauge_shows_its_last_beat_when_scraped_and_goes_when_it_is_forgotten() -> None:
    import time

    from prometheus_client import CollectorRegistry

    from pipeline.ops.health import Heartbeats
    from pipeline.ops.metrics import PipelineMetrics

    registry = CollectorRegistry()
    heartbeats = Heartbeats(PipelineMetrics(registry))

    def scraped() -> float | None:
        return registry.get_sample_value("vap_thread_heartbeat_timestamp_seconds", {"thread": "reader-cam"})

    before = time.time()
    heartbeats.beat("reader-cam")
    first = scraped()
    time.sleep(0.02)
    heartbeats.beat("reader-cam", busy_for_s=30)
    second = scraped()

    assert first is not None and before <= first <= time.time()
    assert second is not None and second > first, "a later beat moves the gauge, a blocking one included"
    assert heartbeats.stuck(max_age_s=10) == [], "announced blocking time is not stuck time"
    heartbeats.forget("reader-cam")
    assert scraped() is None and heartbeats.stuck(max_age_s=0) == []
