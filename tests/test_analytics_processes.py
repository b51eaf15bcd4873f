"""Analytics workers (`analytics.processes`): a stream's tracking, zones and lines in a worker process give what
they give in the pipeline's process, frame by frame, and a worker's failure costs a stream its tracks, never
its frames."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from pipeline.analytics import processes as analytics_processes
from pipeline.analytics.processes import LANE_FRAMES, AnalyticsFailed, AnalyticsProcesses, RemoteAnalytics
from pipeline.analytics.stage import AnalyticsStage, StreamAnalysis
from pipeline.analytics.zones import StreamAnalytics
from pipeline.config import AnalyticsConfig, AnalyticsStageConfig, SnapshotConfig
from pipeline.frames import Detections, FrameResult
from pipeline.publishing.building import MessageBuilder
from pipeline.publishing.spool import OutgoingMessage
from tests.conftest import wait_for
from tests.fakes import Stages
from tests.test_analytics_stage import Published

WORKER_START_S = 30
LABELS = {0: "person", 1: "car"}
CONFIG = AnalyticsConfig.model_validate({
    "tracking": True,
    "zones": [{"id": "left", "polygon": [[0, 0], [160, 0], [160, 180], [0, 180]], "dwell_s": 0.5,
               "classes": ["person"]}],
    "lines": [{"id": "middle", "start": [160, 0], "end": [160, 180], "directions": ["east", "west"]}],
})


def crossing(stages: Stages, stream_id: str, frame_id: int) -> FrameResult:
    """Two people and a car crossing a 320x180 image from left to right and back, 10 frames a second; every
    tenth frame finds nothing, and frame 7 has no media time."""
    frame = stages.frame(stream_id, frame_id, width=320, height=180)
    if frame_id == 7:
        frame = replace(frame, pts_ms=None)
    if frame_id % 10 == 9:
        return FrameResult(frame, "detect", Detections.empty(), LABELS)
    phase = frame_id % 60
    left = np.array([10.0, 60.0, 110.0]) + (phase if phase < 30 else 60 - phase) * 6 + len(stream_id)
    top = np.array([20.0, 70.0, 120.0])
    boxes = np.stack([left, top, left + 30, top + 40], 1).astype(np.float32)
    detections = Detections(boxes, np.array([0.9, 0.8, 0.7], np.float32), np.array([0, 1, 0], np.int64))
    return FrameResult(frame, "detect", detections, LABELS)


def outcome(analysis: StreamAnalysis, result: FrameResult) -> tuple[Any, ...]:
    analysed, events = analysis.process(result)
    return analysed.detections.track_ids, analysed.zones, events, analysis.occupancy()


def assert_same(analysis: StreamAnalysis, reference: StreamAnalysis, result: FrameResult) -> None:
    assert outcome(analysis, result) == outcome(reference, result), f"frame {result.frame.frame_id}"


@pytest.fixture
def stages() -> Stages:
    return Stages()


@pytest.fixture
def pool() -> Iterator[AnalyticsProcesses]:
    made = AnalyticsProcesses(2, "test-model")
    made.start()
    wait_for(lambda: made.ready_workers == 2, WORKER_START_S, "two analytics workers should start")
    yield made
    made.close()


def in_worker(pool: AnalyticsProcesses, stream_id: str) -> RemoteAnalytics:
    analysis = pool.analysis_for(stream_id, CONFIG, "bytetrack", LABELS)
    assert isinstance(analysis, RemoteAnalytics)
    return analysis


def refused_by_its_worker(analysis: StreamAnalysis) -> RemoteAnalytics:
    """The stream's analytics made to raise in its worker, on every frame: the state it ships there is broken
    (nothing a real stream can send raises in the tracker or the zones)."""
    assert isinstance(analysis, RemoteAnalytics)
    analysis._here._tracks = None  # type: ignore[assignment]
    return analysis


def test_streams_analysed_in_workers_get_the_track_ids_zones_events_and_occupancy_they_get_here(
        pool: AnalyticsProcesses, stages: Stages) -> None:
    streams = ("cam-a", "cam-bb")
    remote = {stream: in_worker(pool, stream) for stream in streams}
    local = {stream: StreamAnalytics(stream, CONFIG, "bytetrack", LABELS) for stream in streams}
    got: dict[str, list[Any]] = {stream: [] for stream in streams}
    wanted: dict[str, list[Any]] = {stream: [] for stream in streams}
    for frame_id in range(80):
        for stream in streams:
            result = crossing(stages, stream, frame_id)
            got[stream].append(outcome(remote[stream], result))
            wanted[stream].append(outcome(local[stream], result))

    assert got == wanted
    events = {event.event for _, _, frame_events, _ in got["cam-a"] for event in frame_events}
    assert events == {"enter", "exit", "dwell", "cross"}, "the scene should produce every kind of event"
    assert any(occupancy for *_, occupancy in got["cam-a"])
    assert remote["cam-a"].worker_pid != remote["cam-bb"].worker_pid, "two streams go to two workers"
    assert set(pool.pids) == {remote["cam-a"].worker_pid, remote["cam-bb"].worker_pid}
    assert pool.frames_in_workers == 160


def test_a_killed_worker_costs_its_stream_its_tracks_once_and_the_stream_moves_on_into_the_replacement(
        pool: AnalyticsProcesses, stages: Stages, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(analytics_processes, "_MOVE_AGAIN_S", 0.2)
    victim, survivor = in_worker(pool, "cam-a"), in_worker(pool, "cam-b")
    continuing = StreamAnalytics("cam-b", CONFIG, "bytetrack", LABELS)
    for frame_id in range(20):
        outcome(victim, crossing(stages, "cam-a", frame_id))
        assert_same(survivor, continuing, crossing(stages, "cam-b", frame_id))
    killed = victim.worker_pid
    assert killed is not None
    os.kill(killed, signal.SIGKILL)

    restarted = StreamAnalytics("cam-a", CONFIG, "bytetrack", LABELS)
    with caplog.at_level(logging.INFO):
        for frame_id in range(20, 30):
            assert_same(victim, restarted, crossing(stages, "cam-a", frame_id))
            assert_same(survivor, continuing, crossing(stages, "cam-b", frame_id))
        assert victim.worker_pid is None and survivor.worker_pid is not None
        assert "stream cam-a: its analytics worker closed its socket" in caplog.text
        assert "its tracks restarted" in caplog.text

        wait_for(lambda: pool.ready_workers == 2, WORKER_START_S, "the killed worker should be replaced")
        time.sleep(0.3)
        for frame_id in range(30, 60):  # its state moves with it: the tracks restarted once, not twice
            assert_same(victim, restarted, crossing(stages, "cam-a", frame_id))
            assert_same(survivor, continuing, crossing(stages, "cam-b", frame_id))
    assert victim.worker_pid not in (None, killed, survivor.worker_pid)
    assert killed not in pool.pids and pool.replacements == 1
    assert "stream cam-a: its analytics moves to analytics worker" in caplog.text


def test_a_stream_added_while_no_worker_is_ready_moves_into_one_later_with_its_tracks(
        stages: Stages, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(analytics_processes, "_MOVE_AGAIN_S", 0.2)
    pool = AnalyticsProcesses(1, "test-model")
    try:
        early = pool.analysis_for("cam-a", CONFIG, "bytetrack", LABELS)  # before the pool starts its workers
        assert isinstance(early, RemoteAnalytics) and early.worker_pid is None
        reference = StreamAnalytics("cam-a", CONFIG, "bytetrack", LABELS)
        for frame_id in range(15):
            assert_same(early, reference, crossing(stages, "cam-a", frame_id))
        pool.start()
        time.sleep(0.3)
        for frame_id in range(15, 50):
            assert_same(early, reference, crossing(stages, "cam-a", frame_id))
        assert early.worker_pid == pool.pids[0] and pool.frames_in_workers == 35
    finally:
        pool.close()


def test_a_worker_that_died_without_a_stream_noticing_is_replaced_when_a_stream_is_added(
        pool: AnalyticsProcesses) -> None:
    dead = pool.pids[0]
    os.kill(dead, signal.SIGKILL)
    wait_for(lambda: Path(f"/proc/{dead}/stat").read_text().split()[2] == "Z", 5, "the worker should die")
    assert in_worker(pool, "cam-a").worker_pid != dead, "the stream goes to the worker still alive"
    assert dead not in pool.pids and pool.replacements == 1
    wait_for(lambda: pool.ready_workers == 2, WORKER_START_S, "the dead worker should be replaced")


def test_a_worker_that_stops_answering_leaves_its_stream_here(
        pool: AnalyticsProcesses, stages: Stages, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(analytics_processes, "_REPLY_S", 0.5)
    stream = in_worker(pool, "cam-a")
    outcome(stream, crossing(stages, "cam-a", 0))
    stuck = stream.worker_pid
    assert stuck is not None
    os.kill(stuck, signal.SIGSTOP)
    try:
        restarted = StreamAnalytics("cam-a", CONFIG, "bytetrack", LABELS)
        assert_same(stream, restarted, crossing(stages, "cam-a", 1))
    finally:
        with contextlib.suppress(ProcessLookupError):  # the pool killed it
            os.kill(stuck, signal.SIGCONT)
    assert stream.worker_pid is None and stuck not in pool.pids and pool.replacements == 1


def test_frames_sent_together_are_analysed_as_one_at_a_time_and_one_that_fails_costs_only_itself(
        pool: AnalyticsProcesses, stages: Stages) -> None:
    together = in_worker(pool, "cam-a")
    reference = StreamAnalytics("cam-a", CONFIG, "bytetrack", LABELS)
    broken = 13  # its confidences do not match its boxes: the tracker raises on it, here as in the worker
    results = [crossing(stages, "cam-a", frame_id) for frame_id in range(40)]
    results[broken] = replace(results[broken], detections=replace(results[broken].detections,
                                                                  confidences=np.array([0.9], np.float32)))
    for first in range(0, len(results), LANE_FRAMES):
        sent = results[first:first + LANE_FRAMES]
        for result, got in zip(sent, together.process_many(sent), strict=True):
            if result.frame.frame_id == broken:
                assert isinstance(got, AnalyticsFailed) and "ValueError" in str(got)
                with pytest.raises(ValueError):
                    reference.process(result)
                assert together.take_messages(result.frame, [], None) is None, "the stage builds this one"
                continue
            assert not isinstance(got, Exception), result.frame.frame_id
            analysed, events = got
            wanted, wanted_events = reference.process(result)
            assert (analysed.detections.track_ids, analysed.zones, events) == \
                (wanted.detections.track_ids, wanted.zones, wanted_events), result.frame.frame_id
            made = together.take_messages(result.frame, events, None)
            assert made is not None and len(made[0]) == 1 + len(events)
    assert together.occupancy() == reference.occupancy()
    assert together.worker_pid is not None and pool.frames_in_workers == 40 and pool.requests == 5


def test_analytics_that_raise_in_the_worker_raise_here_and_the_worker_serves_on(
        pool: AnalyticsProcesses, stages: Stages) -> None:
    failing = refused_by_its_worker(in_worker(pool, "cam-a"))
    with pytest.raises(AnalyticsFailed, match=r"(?s)in analytics worker \d.*AttributeError"):
        failing.process(crossing(stages, "cam-a", 0))
    assert failing.worker_pid is not None, "a failed frame is not a failed worker"

    in_worker(pool, "cam-filler")  # to the other worker: the next stream then shares the failing one's
    healthy = in_worker(pool, "cam-b")
    assert healthy.worker_pid == failing.worker_pid
    assert_same(healthy, StreamAnalytics("cam-b", CONFIG, "bytetrack", LABELS), crossing(stages, "cam-b", 0))


def test_a_stream_goes_to_the_worker_with_the_fewest_streams_and_a_removed_one_frees_its_place(
        pool: AnalyticsProcesses) -> None:
    first, second = in_worker(pool, "cam-a"), in_worker(pool, "cam-b")
    assert first.worker_pid != second.worker_pid
    freed = first.worker_pid
    first.close()
    assert first.worker_pid is None
    assert in_worker(pool, "cam-c").worker_pid == freed


def test_with_botsort_every_stream_keeps_its_analytics_here(pool: AnalyticsProcesses,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        analysis = pool.analysis_for("cam-a", CONFIG, "botsort", LABELS)
    assert isinstance(analysis, StreamAnalytics)
    assert "analytics.processes is ignored with tracking.tracker botsort" in caplog.text


def test_a_closed_pool_stops_its_workers_and_its_streams_go_on_here(pool: AnalyticsProcesses,
                                                                     stages: Stages) -> None:
    stream = in_worker(pool, "cam-a")
    outcome(stream, crossing(stages, "cam-a", 0))
    workers = pool.pids
    pool.close()
    for pid in workers:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # already reaped: the pool waited for its end
    restarted = StreamAnalytics("cam-a", CONFIG, "bytetrack", LABELS)
    assert_same(stream, restarted, crossing(stages, "cam-a", 1))
    assert pool.pids == [] and stream.worker_pid is None
    assert isinstance(pool.analysis_for("cam-b", CONFIG, "bytetrack", LABELS), StreamAnalytics)


def test_the_stage_runs_each_streams_analytics_in_a_worker_and_counts_what_fails_there(
        stages: Stages) -> None:
    published = Published(stages)
    stage = AnalyticsStage(AnalyticsStageConfig(processes=2), MessageBuilder("test-model", SnapshotConfig()),
                           published, stages.ledger, stages.metrics, stages.heartbeats)
    stage.start()
    never = threading.Event()
    try:
        assert stage.processes is not None
        analyses = {stream: stage.new_analysis(stream, CONFIG, "bytetrack", LABELS) for stream in ("cam-a", "cam-b")}
        removed, _ = analyses["cam-a"], refused_by_its_worker(analyses["cam-b"])
        assert isinstance(removed, RemoteAnalytics)
        for stream, analysis in analyses.items():
            stage.add_stream(stream, stages.add_stream(stream), analysis, wait_when_full=True)
        for frame_id in range(30):
            stage.submit_batch([crossing(stages, stream, frame_id) for stream in analyses], never)
        wait_for(lambda: len(published.frames("cam-a")) == len(published.frames("cam-b")) == 30, 20,
                 "every frame should be published")
        stage.remove_stream(stages.runs["cam-a"])
        wait_for(lambda: removed.worker_pid is None, 5, "a removed stream leaves its worker")
    finally:
        stage.stop_within(0.0)

    local, elsewhere = StreamAnalytics("cam-a", CONFIG, "bytetrack", LABELS), Stages()
    wanted = [outcome(local, crossing(elsewhere, "cam-a", frame_id))[0] for frame_id in range(30)]
    assert [tuple(d["track_id"] for d in m["detections"]) for m in published.frames("cam-a")] == wanted  # type: ignore[attr-defined]
    assert any(message.event for _, message in published.messages), "the worker's events are published"
    assert all(d["track_id"] is None for m in published.frames("cam-b") for d in m["detections"])  # type: ignore[attr-defined]
    assert stages.value("vap_analytics_errors_total", stream="cam-b") == 30
    stages.assert_settled("cam-a", "cam-b")
    assert stage.processes.pids == [], "the workers stop with the stage"


def comparable(message: OutgoingMessage) -> dict[str, Any]:
    """A message without what depends on the moment it was built."""
    decoded: dict[str, Any] = orjson.loads(message.value)
    decoded.pop("published_at")
    if not message.event:
        del decoded["latency_ms"]["total"]
    return decoded


def test_the_worker_builds_the_frames_and_events_messages_the_pipelines_process_builds(
        pool: AnalyticsProcesses, stages: Stages) -> None:
    remote, local = in_worker(pool, "cam-a"), StreamAnalytics("cam-a", CONFIG, "bytetrack", LABELS)
    here = MessageBuilder("test-model", SnapshotConfig())
    series = stages.ledger.series("cam-a", stages.runs.get("cam-a") or stages.add_stream("cam-a"))
    events = 0
    for frame_id in range(40):
        result = crossing(stages, "cam-a", frame_id)
        polygons = tuple(None if index == 1 else np.array([[1.5, 2.25], [30.125, 2.0], [12.0, 40.0]], np.float32)
                         + index for index in range(len(result.detections)))  # the car's outline is missing
        result = replace(result, detections=replace(result.detections, polygons=polygons), queue_ms=2.5,
                         inference_ms=9.75)
        _, found = remote.process(result)
        made = remote.take_messages(result.frame, found, series)
        assert made is not None, "the worker builds the messages"
        wanted_result, wanted_events = local.process(result)
        wanted = [here.frame_message(wanted_result, None)] + [here.event_message(e, None) for e in wanted_events]
        assert [(m.key, m.event, comparable(m)) for m in made[0]] == [(m.key, m.event, comparable(m)) for m in wanted]
        assert made[0][0].ticket == result.frame.ticket and made[1] > 0
        events += len(found)
    assert events > 0
    assert remote.take_messages(result.frame, [], series) is None, "a frame's messages are taken once"


def run_stage(stages: Stages, processes: int, snapshots: SnapshotConfig | None = None,
              ) -> tuple[Published, AnalyticsStage]:
    """Two tracked streams, 40 frames each, through the analytics stage; what it published."""
    published = Published(stages)
    stage = AnalyticsStage(AnalyticsStageConfig(processes=processes),
                           MessageBuilder("test-model", snapshots or SnapshotConfig()), published, stages.ledger,
                           stages.metrics, stages.heartbeats)
    stage.start()
    try:
        for stream in ("cam-a", "cam-b"):
            stage.add_stream(stream, stages.add_stream(stream), stage.new_analysis(stream, CONFIG, "bytetrack", LABELS),
                             wait_when_full=True)
        for frame_id in range(40):
            stage.submit_batch([crossing(stages, stream, frame_id) for stream in ("cam-a", "cam-b")],
                               threading.Event())
        wait_for(lambda: len(published.frames("cam-a")) == len(published.frames("cam-b")) == 40, 20,
                 "every frame should be published")
    finally:
        stage.stop_within(0.0)
    stages.assert_settled("cam-a", "cam-b")
    return published, stage


def published_by_stream(published: Published) -> dict[tuple[bytes, bool], list[dict[str, Any]]]:
    by_stream: dict[tuple[bytes, bool], list[dict[str, Any]]] = {}
    for _, message in published.messages:
        decoded = comparable(message)
        for moment in ("captured_at", "occurred_at"):  # the two runs read their frames at different times
            decoded.pop(moment, None)
        by_stream.setdefault((message.key, message.event), []).append(decoded)
    return by_stream


def test_a_stage_with_analytics_workers_publishes_what_one_without_them_publishes() -> None:
    with_workers, stage = run_stage(Stages(), processes=2)
    assert stage.processes is not None and stage.processes.frames_in_workers == 80
    assert stage.processes.requests < 80, "frames that waited in a lane went to its worker together"
    without, _ = run_stage(Stages(), processes=0)
    got, wanted = published_by_stream(with_workers), published_by_stream(without)
    assert sum(len(messages) for (_, event), messages in wanted.items() if event) > 0
    assert got == wanted


def test_with_snapshots_the_workers_analyse_and_the_stage_builds_the_messages(tmp_path: Path) -> None:
    stages = Stages()
    published, stage = run_stage(stages, 1, SnapshotConfig(dir=tmp_path, every_n_frames=1))
    assert stage.processes is not None and stage.processes.frames_in_workers == 80
    frames = published.frames("cam-a")
    assert all("snapshot" in message for message in frames)
    assert any(d["track_id"] is not None for m in frames for d in m["detections"])  # type: ignore[attr-defined]


def test_a_stop_with_a_stuck_worker_ends_within_its_budget_and_settles_every_frame(stages: Stages) -> None:
    published = Published(stages)
    stage = AnalyticsStage(AnalyticsStageConfig(processes=1), MessageBuilder("test-model", SnapshotConfig()),
                           published, stages.ledger, stages.metrics, stages.heartbeats)
    stage.start()
    assert stage.processes is not None
    stuck = stage.processes.pids[0]
    try:
        stage.add_stream("cam-a", stages.add_stream("cam-a"), stage.new_analysis("cam-a", CONFIG, "bytetrack", LABELS),
                         wait_when_full=False)
        stage.submit_batch([crossing(stages, "cam-a", 0)], threading.Event())
        wait_for(lambda: len(published.frames("cam-a")) == 1, 10, "the first frame should be published")
        os.kill(stuck, signal.SIGSTOP)
        for frame_id in range(1, 6):
            stage.submit_batch([crossing(stages, "cam-a", frame_id)], threading.Event())
        started = time.monotonic()
        stage.stop_within(started + 0.5)
        stopped_in = time.monotonic() - started
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stuck, signal.SIGCONT)
    assert stopped_in < 0.5 + 1.5, f"{stopped_in:.1f} s: the stage's 0.5 s and the workers' 1 s to quit"
    # The frames the stuck worker held (one or a few: what waited in the lane when its thread took them) go on in
    # this process once the worker is killed, a moment after the stop; the ones still waiting then are dropped.
    wait_for(lambda: len(published.frames("cam-a")) + stages.dropped("cam-a", "shutdown") == 6, 3,
             "every frame should be published or dropped")
    held = len(published.frames("cam-a")) - 1
    assert 1 <= held <= LANE_FRAMES and stages.dropped("cam-a", "shutdown") == 5 - held
    stages.assert_settled("cam-a")
    assert stage.processes.pids == []
    wait_for(lambda: not Path(f"/proc/{stuck}").exists(), 3, "the stuck worker should be killed and reaped")
