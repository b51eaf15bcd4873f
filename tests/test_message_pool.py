"""Message workers (`analytics.message_processes`): messages built in worker processes are the messages the
pipeline's process builds, every frame is published or counted as dropped, and no frame depends on a worker."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from pipeline.analytics.stage import AnalyticsStage
from pipeline.analytics.zones import ZoneEvent
from pipeline.app import Pipeline
from pipeline.config import AnalyticsStageConfig, SnapshotConfig
from pipeline.frames import Classification, Detections, FrameResult, pack_detections, unpack_detections
from pipeline.publishing import message_pool
from pipeline.publishing.building import MessageBuilder
from pipeline.publishing.message_pool import MessagePool
from pipeline.publishing.spool import OutgoingMessage
from pipeline.tools.broker import EmbeddedBroker
from tests.conftest import (
    CLIP_FRAMES,
    ConfigFactory,
    assert_same_detections,
    http_call,
    publish_clips,
    wait_for,
)
from tests.fakes import Stages, make_result
from tests.test_analytics_stage import Published

WORKER_START_S = 30
LABELS = {0: "person", 1: "car", 2: "bicycle"}


def varied_results(stages: Stages, streams: int = 3, frames: int = 6, seed: int = 1) -> list[FrameResult]:
    """Frames in stream order with none, one or several detections, polygons or none, an outline that is missing,
    a frame without a position in its stream, and a frame whose box the model overflowed on."""
    generator = np.random.default_rng(seed)
    results = []
    for frame_id in range(frames):
        for stream in range(streams):
            frame = stages.frame(f"cam-{stream}", frame_id, width=320, height=180)
            if frame_id == 2:
                frame = replace(frame, pts_ms=None)
            count = (frame_id + stream) % 4
            corners = generator.uniform(0, 150, (count, 2)).astype(np.float32)
            boxes = np.concatenate([corners, corners + generator.uniform(5, 30, (count, 2))], 1).astype(np.float32)
            polygons: tuple[Any, ...] = ()
            if stream != 0:
                polygons = tuple(None if (frame_id, index) == (2, 1) else
                                 generator.uniform(0, 180, (int(generator.integers(3, 40)), 2)).astype(np.float32)
                                 for index in range(count))
            if (frame_id, stream) == (4, 2):
                boxes[0, 2] = np.inf
            detections = Detections(boxes, generator.uniform(0.2, 1, count).astype(np.float32),
                                    generator.integers(0, 3, count).astype(np.int64), polygons)
            results.append(replace(make_result(frame), detections=detections, labels=LABELS, queue_ms=3.25,
                                   inference_ms=11.5 + frame_id))
    return results


def comparable(message: OutgoingMessage) -> dict[str, Any]:
    """A frame's message without what depends on the moment it was built."""
    decoded: dict[str, Any] = orjson.loads(message.value)
    del decoded["published_at"], decoded["latency_ms"]["total"]
    return decoded


def built_here(results: list[FrameResult]) -> list[OutgoingMessage]:
    builder = MessageBuilder("test-model", SnapshotConfig())
    return [builder.frame_message(result, None) for result in results]


@pytest.fixture
def stages() -> Stages:
    return Stages()


@pytest.fixture
def published(stages: Stages) -> Published:
    return Published(stages)


@pytest.fixture
def pool(stages: Stages, published: Published) -> Iterator[MessagePool]:
    made = MessagePool(2, MessageBuilder("test-model", SnapshotConfig()), published, stages.ledger,
                       stages.metrics.stage_seconds.labels(stage="serialize"))
    yield made
    made.close()


def ready(pool: MessagePool, workers: int = 2) -> MessagePool:
    """The pool's workers started and ready (a replaced one is started after its pause)."""
    def started() -> bool:
        pool.start()
        return pool.ready_workers == workers

    wait_for(started, WORKER_START_S, f"{workers} message workers should start")
    return pool


def test_packed_detections_come_back_as_they_were_sent(stages: Stages) -> None:
    sent = [result.detections for result in varied_results(stages)] + [Detections.empty()]
    received = unpack_detections(pack_detections(sent))
    assert len(received) == len(sent)
    for got, expected in zip(received, sent, strict=True):
        np.testing.assert_array_equal(got.boxes_xyxy, expected.boxes_xyxy)
        np.testing.assert_array_equal(got.class_ids, expected.class_ids)
        assert len(got.polygons) == len(expected.polygons)
        for polygon, expected_polygon in zip(got.polygons, expected.polygons, strict=True):
            assert (polygon is None) == (expected_polygon is None)
            if polygon is not None:
                np.testing.assert_array_equal(polygon, expected_polygon)


def test_workers_build_the_messages_the_pipelines_process_builds(pool: MessagePool, stages: Stages,
                                                                 published: Published) -> None:
    results = varied_results(stages)
    ready(pool).publish(results)

    assert pool.frames_in_workers == len(results) and pool.frames_here == 0
    sent = [message for _, message in published.messages]
    expected = built_here(results)
    assert [comparable(message) for message in sent] == [comparable(message) for message in expected]
    assert [(message.key, message.ticket) for message in sent] == [(m.key, m.ticket) for m in expected]
    masks = [d["mask"] for message in sent if message.key != b"cam-0" for d in comparable(message)["detections"]]
    assert len(masks) >= 10 and None in masks and any(mask is not None for mask in masks)
    stages.assert_settled("cam-0", "cam-1", "cam-2")
    for stream in ("cam-0", "cam-1", "cam-2"):
        found = Counter(d["label"] for m in sent for d in comparable(m)["detections"] if m.key == stream.encode())
        for label in LABELS.values():
            assert stages.value("vap_detections_total", stream=stream, label=label) == found[label], (stream, label)
        assert stages.value("vap_end_to_end_latency_seconds_count", stream=stream) == 6
    assert stages.value("vap_stage_seconds_count", stage="serialize") == len(results)


def test_classification_results_are_built_by_the_workers_too(pool: MessagePool, stages: Stages,
                                                             published: Published) -> None:
    results = [replace(make_result(stages.frame("cam", frame_id)), task="classify", labels=LABELS,
                       classes=(Classification(1, "car", 0.75), Classification(0, "person", 0.125)))
               for frame_id in range(4)]
    ready(pool).publish(results)
    assert pool.frames_in_workers == 4
    assert [comparable(m) for _, m in published.messages] == [comparable(m) for m in built_here(results)]


def test_a_frame_that_cannot_be_built_is_dropped_and_the_others_are_published(pool: MessagePool, stages: Stages,
                                                                              published: Published) -> None:
    unwritable: Any = {0: "person", 1: object()}  # orjson refuses it, in the worker and here
    results = [replace(make_result(stages.frame("cam", frame_id)), labels=unwritable,
                       detections=Detections(np.array([[1, 2, 30, 40]], np.float32), np.ones(1, np.float32),
                                             np.array([int(frame_id == 2)], np.int64)))
               for frame_id in range(4)]
    workers = ready(pool).pids

    pool.publish(results)

    assert [comparable(m)["frame_id"] for _, m in published.messages] == [0, 1, 3]
    assert stages.dropped("cam", "build_error") == 1
    stages.assert_settled("cam")
    assert pool.frames_in_workers == 3 and pool.pids == workers, "a frame, not a worker, failed"


def test_a_killed_worker_costs_no_frame_and_is_replaced(pool: MessagePool, stages: Stages,
                                                        published: Published) -> None:
    ready(pool)
    killed = pool.pids[0]
    os.kill(killed, signal.SIGKILL)
    results = varied_results(stages)

    pool.publish(results)  # by the other worker, and here when the killed one was sent its part before it died

    assert [comparable(m) for _, m in published.messages] == [comparable(m) for m in built_here(results)]
    assert pool.frames_in_workers + pool.frames_here == len(results)
    stages.assert_settled("cam-0", "cam-1", "cam-2")
    ready(pool)
    assert killed not in pool.pids and len(pool.pids) == 2 and pool.replacements == 1


def test_a_worker_that_stops_answering_is_replaced_after_the_reply_wait(
        pool: MessagePool, stages: Stages, published: Published, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(message_pool, "_REPLY_S", 0.5)
    ready(pool)
    stuck = pool.pids[1]
    os.kill(stuck, signal.SIGSTOP)
    try:
        results = varied_results(stages)
        pool.publish(results)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stuck, signal.SIGCONT)
    assert [comparable(m) for _, m in published.messages] == [comparable(m) for m in built_here(results)]
    assert stuck not in pool.pids and pool.replacements == 1


def test_a_closed_pool_stops_its_workers_and_builds_here(pool: MessagePool, stages: Stages,
                                                         published: Published) -> None:
    workers = ready(pool).pids
    pool.close()
    for pid in workers:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # already reaped: the pool waited for its end
    results = varied_results(stages, frames=2)
    pool.publish(results)
    assert pool.frames_here == len(results) and pool.pids == []
    assert [comparable(m) for _, m in published.messages] == [comparable(m) for m in built_here(results)]


class Tracking:
    """Stands in for a stream's tracker: every detection gets track id 7."""

    def process(self, result: FrameResult) -> tuple[FrameResult, list[ZoneEvent]]:
        return replace(result, detections=replace(result.detections, track_ids=(7,) * len(result.detections))), []

    def occupancy(self) -> dict[tuple[str, str], int]:
        return {}


def stage_with_workers(stages: Stages, published: Published, snapshots: SnapshotConfig | None = None,
                       ) -> AnalyticsStage:
    stage = AnalyticsStage(AnalyticsStageConfig(message_processes=1),
                           MessageBuilder("test-model", snapshots or SnapshotConfig()), published, stages.ledger,
                           stages.metrics, stages.heartbeats)
    stage.start()
    return stage


def test_the_stage_sends_streams_without_analytics_to_the_workers_and_keeps_every_stream_in_order(
        stages: Stages, published: Published) -> None:
    stage = stage_with_workers(stages, published)
    never = threading.Event()
    try:
        assert stage.messages is not None
        ready(stage.messages, workers=1)
        for stream in ("cam-0", "cam-1", "cam-2"):
            stage.add_stream(stream, stages.add_stream(stream), Tracking() if stream == "cam-1" else None,
                             wait_when_full=True)
        results = varied_results(stages)
        for first in range(0, len(results), 4):
            stage.submit_batch(results[first:first + 4], never)
        wait_for(lambda: len(published.messages) == len(results), 10, "every frame should be published")
    finally:
        stage.stop_within(0.0)

    assert stage.messages.frames_in_workers == 12 and stage.messages.frames_here == 0
    for stream in ("cam-0", "cam-1", "cam-2"):
        sent = published.frames(stream)
        assert [message["frame_id"] for message in sent] == list(range(6))
        track_ids = {d["track_id"] for message in sent for d in message["detections"]}  # type: ignore[attr-defined]
        assert track_ids == ({7} if stream == "cam-1" else {None}), stream
    stages.assert_settled("cam-0", "cam-1", "cam-2")
    assert stage.messages.pids == [], "the workers stop with the stage"


def test_with_snapshots_the_stage_builds_every_message_itself(stages: Stages, published: Published, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        stage = stage_with_workers(stages, published, SnapshotConfig(dir=tmp_path, every_n_frames=1))
    try:
        assert stage.messages is None
        assert "analytics.message_processes is ignored while kafka.snapshots is set" in caplog.text
        stage.add_stream("cam", stages.add_stream("cam"), None, wait_when_full=True)
        stage.submit_batch([make_result(stages.frame("cam", frame_id)) for frame_id in range(3)], threading.Event())
        wait_for(lambda: len(published.messages) == 3, 10, "every frame should be published")
    finally:
        stage.stop_within(0.0)
    assert all("snapshot" in message for message in published.frames("cam"))


def status_into(statuses: list[dict[str, Any]], pipeline: Pipeline) -> None:
    assert pipeline.http is not None
    statuses.append(http_call(pipeline.http.port, "GET", "/api/v1/status")[1])


def test_a_pipeline_with_message_workers_publishes_what_one_without_them_publishes(
        broker: EmbeddedBroker, clips: dict[str, Path], make_config: ConfigFactory) -> None:
    results = {}
    statuses: list[dict[str, Any]] = []
    for processes in (0, 2):
        pipeline, results[processes] = publish_clips(
            broker, clips, make_config, f"message-workers-{processes}",
            before_stop=functools.partial(status_into, statuses), analytics={"message_processes": processes})
        assert statuses[-1]["helper_processes"].get("message processes", 0) == processes
        workers = pipeline.analytics.messages if pipeline.analytics is not None else None
        if processes:
            assert workers is not None and workers.frames_in_workers == 2 * CLIP_FRAMES
            assert workers.pids == [], "the workers stop with vap"
        else:
            assert workers is None
    assert_same_detections(results[2], results[0], 2 * CLIP_FRAMES)
