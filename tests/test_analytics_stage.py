"""The analytics stage: per-stream lanes, a slow stream that delays only itself, and every failure counted."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson

from pipeline.analytics.stage import AnalyticsStage
from pipeline.analytics.zones import ZoneEvent
from pipeline.config import AnalyticsStageConfig, SnapshotConfig
from pipeline.frames import Detections, FrameResult
from pipeline.publishing.building import MessageBuilder
from pipeline.publishing.spool import OutgoingMessage
from tests.conftest import wait_until
from tests.fakes import Stages, make_result


class Published:
    """Stands in for the publisher: keeps what it is given, and settles each frame as Kafka would."""

    def __init__(self, stages: Stages) -> None:
        self._stages = stages
        self._lock = threading.Lock()
        self.messages: list[tuple[float, OutgoingMessage]] = []

    def __call__(self, messages: list[OutgoingMessage]) -> None:
        with self._lock:
            self.messages += [(time.monotonic(), message) for message in messages]
        for message in messages:
            if message.ticket is not None:
                self._stages.ledger.published(message.ticket)

    def frames(self, stream_id: str) -> list[dict[str, object]]:
        with self._lock:
            return [orjson.loads(message.value) for _, message in self.messages
                    if not message.event and message.key == stream_id.encode()]


class SlowAnalysis:
    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def process(self, result: FrameResult) -> tuple[FrameResult, list[ZoneEvent]]:
        time.sleep(self._seconds)
        return result, []

    def occupancy(self) -> dict[tuple[str, str], int]:
        return {}


class FailingAnalysis(SlowAnalysis):
    def __init__(self) -> None:
        super().__init__(0.0)

    def process(self, result: FrameResult) -> tuple[FrameResult, list[ZoneEvent]]:
        if result.frame.frame_id % 2:
            raise RuntimeError("the tracker failed")
        tracked = replace(result.detections, track_ids=(7,) * len(result.detections))
        return replace(result, detections=tracked), []


def one_box_result(stages: Stages, stream_id: str, frame_id: int) -> FrameResult:
    detections = Detections(boxes_xyxy=np.array([[1, 2, 10, 12]], np.float32), confidences=np.ones(1, np.float32),
                            class_ids=np.zeros(1, np.int64))
    return replace(make_result(stages.frame(stream_id, frame_id)), detections=detections, labels={0: "box"})


def stage_for(stages: Stages, published: Published, workers: int = 2, queue_size: int = 8,
              snapshots: SnapshotConfig | None = None) -> AnalyticsStage:
    stage = AnalyticsStage(AnalyticsStageConfig(workers=workers, queue_size=queue_size),
                           MessageBuilder("test-model", snapshots or SnapshotConfig()), published, stages.ledger,
                           stages.metrics, stages.heartbeats)
    stage.start()
    return stage


def stop(stage: AnalyticsStage) -> None:
    stage.stop()
    assert stage.join(5)


def test_a_stream_with_slow_analytics_delays_only_itself() -> None:
    stages, never = Stages(), threading.Event()
    published = Published(stages)
    stage = stage_for(stages, published)
    stage.add_stream("slow", stages.add_stream("slow"), SlowAnalysis(0.3), wait_when_full=True)
    stage.add_stream("fast", stages.add_stream("fast"), None, wait_when_full=True)
    started = time.monotonic()
    for frame_id in range(4):
        stage.submit(make_result(stages.frame("slow", frame_id)), never)
    for frame_id in range(4):
        stage.submit(make_result(stages.frame("fast", frame_id)), never)
    assert wait_until(lambda: len(published.frames("fast")) == 4, timeout_s=5)
    fast_done = max(at for at, message in published.messages if message.key == b"fast") - started
    assert fast_done < 0.3, f"the fast stream waited {fast_done:.2f} s behind the slow one"
    assert wait_until(lambda: len(published.frames("slow")) == 4, timeout_s=5)
    assert [message["frame_id"] for message in published.frames("slow")] == [0, 1, 2, 3], "a stream stays in order"
    stop(stage)
    stages.assert_settled("slow", "fast")


def test_when_analytics_fails_the_frame_is_published_without_track_ids_and_the_failure_is_counted() -> None:
    stages, never = Stages(), threading.Event()
    published = Published(stages)
    stage = stage_for(stages, published)
    stage.add_stream("cam", stages.add_stream("cam"), FailingAnalysis(), wait_when_full=True)
    for frame_id in range(4):
        stage.submit(one_box_result(stages, "cam", frame_id), never)
    assert wait_until(lambda: len(published.frames("cam")) == 4)
    stop(stage)
    tracks = [[detection["track_id"] for detection in message["detections"]]  # type: ignore[attr-defined]
              for message in published.frames("cam")]
    assert tracks == [[7], [None], [7], [None]]
    assert stages.value("vap_analytics_errors_total", stream="cam") == 2
    stages.assert_settled("cam")


def test_a_result_whose_message_cannot_be_built_is_dropped_and_counted_and_the_stream_goes_on(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "snapshots"
    not_a_directory.write_text("a file where the snapshot directory should be", encoding="utf-8")
    stages, never = Stages(), threading.Event()
    published = Published(stages)
    stage = stage_for(stages, published, snapshots=SnapshotConfig(dir=not_a_directory, every_n_frames=1))
    stage.add_stream("cam", stages.add_stream("cam"), None, wait_when_full=True)
    broken = {3, 7}
    for frame_id in range(10):
        result = make_result(stages.frame("cam", frame_id))
        if frame_id in broken:  # two boxes but one confidence and class id
            result = replace(result, detections=Detections(boxes_xyxy=np.zeros((2, 4), np.float32),
                                                           confidences=np.ones(1, np.float32),
                                                           class_ids=np.zeros(1, np.int64)))
        stage.submit(result, never)
    assert wait_until(lambda: len(published.frames("cam")) == 8)
    stop(stage)
    assert [message["frame_id"] for message in published.frames("cam")] == [i for i in range(10) if i not in broken]
    assert all("snapshot" not in message for message in published.frames("cam")), \
        "a snapshot that cannot be written costs the picture, not the message"
    assert stages.dropped("cam", "build_error") == 2
    stages.assert_settled("cam")


def test_a_live_stream_s_full_lane_drops_its_oldest_while_a_file_s_waits() -> None:
    stages, never = Stages(), threading.Event()
    published = Published(stages)
    stage = stage_for(stages, published, workers=1, queue_size=2)
    stage.add_stream("live", stages.add_stream("live"), SlowAnalysis(0.2), wait_when_full=False)
    for frame_id in range(6):
        stage.submit(make_result(stages.frame("live", frame_id)), never)
    assert wait_until(lambda: stages.ledger.totals("live").in_flight == 0)  # type: ignore[union-attr]
    lost = stages.dropped("live", "analytics_queue_full")
    assert lost >= 3, "the lane holds two; the rest of a burst goes, oldest first"
    assert [message["frame_id"] for message in published.frames("live")][-2:] == [4, 5], "the freshest are kept"
    stage.add_stream("file", stages.add_stream("file"), SlowAnalysis(0.05), wait_when_full=True)
    for frame_id in range(6):
        stage.submit(make_result(stages.frame("file", frame_id)), never)
    assert wait_until(lambda: len(published.frames("file")) == 6)
    stop(stage)
    assert stages.dropped("file", "analytics_queue_full") == 0
    assert stages.value("vap_queue_depth", stage="analytics") == 0, "the gauge follows the lanes back to empty"
    stages.assert_settled("live", "file")


def test_results_of_a_removed_run_are_published_but_never_reach_the_analytics_of_the_new_run() -> None:
    stages, never = Stages(), threading.Event()
    published = Published(stages)
    stage = stage_for(stages, published)
    old_run = stages.add_stream("cam")
    old = SlowAnalysis(0.0)
    stage.add_stream("cam", old_run, old, wait_when_full=True)
    late = make_result(stages.frame("cam", 0))
    stage.remove_stream(old_run)
    new_run = stages.add_stream("cam")

    class Refusing(SlowAnalysis):
        def process(self, result: FrameResult) -> tuple[FrameResult, list[ZoneEvent]]:
            raise AssertionError(f"frame {result.frame.frame_id} of run {result.frame.run} reached the new run")

    stage.add_stream("cam", new_run, Refusing(0.0), wait_when_full=True)
    stage.submit(late, never)
    assert wait_until(lambda: len(published.frames("cam")) == 1)
    stop(stage)
    assert stages.value("vap_analytics_errors_total", stream="cam") == 0
