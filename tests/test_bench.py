"""The bench's host-ceiling run: vap with an instant model, looping clips, timed over a frame target."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from pipeline.frames import Detections, Frame, FrameResult
from pipeline.tools.bench import (
    BenchOptions,
    BenchReport,
    Measurement,
    ReplayDetector,
    _write_bench_clip,
    bracketing,
    codec_available,
    format_report,
    looping,
    measure_sweep,
    model_runtime_share,
    run_vap,
    vap_config,
)
from pipeline.tools.broker import EmbeddedBroker
from tests.conftest import CLIP_FRAMES, decode, read_topic, unused_topic


def _sample(frame_id: int, boxes: list[list[float]]) -> FrameResult:
    frame = Frame("sample", frame_id, None, datetime.now(timezone.utc), 0.0, np.zeros((4, 4, 3), np.uint8))
    detections = Detections(np.array(boxes, np.float32), np.full(len(boxes), 0.5, np.float32),
                            np.zeros(len(boxes), np.int64))
    return FrameResult(frame=frame, task="detect", detections=detections, labels={0: "box"})


def test_host_ceiling_loops_the_clips_until_the_target_and_publishes_the_replayed_detections(
        broker: EmbeddedBroker, clips: dict[str, Path], model_weights: str) -> None:
    options = BenchOptions(streams=2, frames=CLIP_FRAMES, width=320, height=192, imgsz=160, batch=4, device="cpu")
    samples = [_sample(0, [[1, 2, 3, 4]]), _sample(1, [[10, 20, 30, 40], [5, 6, 7, 8]])]
    replay = ReplayDetector("replay", "detect", "cpu", {0: "box"}, samples)
    topic = unused_topic("ceiling")
    target = 3 * options.streams * CLIP_FRAMES
    config = looping(vap_config(options, model_weights, [clips["landscape"]] * 2, broker.bootstrap_servers, topic,
                                False, "cpu"))

    measured = run_vap(config, "ceiling", "cpu", timeout_s=60, detector_factory=lambda _c, _d: replay,
                       until_frames=target)

    assert measured.frames >= target, "the clips loop until the target, though each holds far fewer frames"
    assert measured.fps > 0 and measured.latency_p99_ms is not None
    assert measured.dropped == 0 and "could not be read back" not in measured.notes, measured.notes
    messages = [decode(record) for record in read_topic(broker.bootstrap_servers, topic, measured.frames)]
    assert len(messages) >= measured.frames
    assert max(message["frame_id"] for message in messages) >= CLIP_FRAMES, "frame ids go on past one pass"
    for message in messages:
        expected = samples[message["frame_id"] % 2].detections.boxes_xyxy.tolist()
        assert [[d["bbox"][k] for k in ("x1", "y1", "x2", "y2")] for d in message["detections"]] == expected


def test_a_file_run_counts_the_messages_the_broker_acknowledged_and_their_latency_from_capture_to_send(
        broker: EmbeddedBroker, clips: dict[str, Path], model_weights: str) -> None:
    options = BenchOptions(streams=2, frames=CLIP_FRAMES, width=320, height=192, imgsz=160, batch=4, device="cpu")
    replay = ReplayDetector("replay", "detect", "cpu", {0: "box"}, [_sample(0, [[1, 2, 3, 4]])])
    topic = unused_topic("bench-file")
    config = vap_config(options, model_weights, [clips["landscape"], clips["portrait"]], broker.bootstrap_servers,
                        topic, False, "cpu")

    measured = run_vap(config, "files", "cpu", timeout_s=60, detector_factory=lambda _c, _d: replay)

    messages = [decode(record) for record in read_topic(broker.bootstrap_servers, topic, 2 * CLIP_FRAMES)]
    assert measured.frames == len(messages) == 2 * CLIP_FRAMES and measured.dropped == 0
    assert measured.latency_p50_ms is not None and measured.latency_p99_ms is not None
    assert measured.cpu_cores is not None and 0 < measured.cpu_cores <= (os.cpu_count() or 1) + 0.5
    by_stage = measured.cpu_ms_per_frame or {}
    in_all = 1000 * measured.cpu_cores * measured.seconds / measured.frames
    assert 0.5 * in_all <= sum(by_stage.values()) <= in_all + 20, (by_stage, in_all)  # 10 ms clock ticks per thread
    own = sorted(message["latency_ms"]["total"] for message in messages)
    assert measured.latency_p50_ms >= own[len(own) // 2] - 1, "send time comes after the message is built"


def test_tracked_bench_streams_each_get_a_zone_over_the_left_half_and_a_line_down_the_middle(
        clips: dict[str, Path], model_weights: str) -> None:
    options = BenchOptions(streams=2, width=320, height=192, tracking=True)
    config = vap_config(options, model_weights, [clips["landscape"], clips["portrait"]], "127.0.0.1:9", "t", False,
                        "cpu")
    for stream in config.streams:
        analytics = stream.analytics
        assert analytics.tracks and analytics.normalized
        assert [(zone.id, zone.polygon) for zone in analytics.zones] == [("left", [(0, 0), (0.5, 0), (0.5, 1), (0, 1)])]
        assert [(line.id, line.start, line.end) for line in analytics.lines] == [("middle", (0.5, 0), (0.5, 1))]
    untracked = vap_config(BenchOptions(), model_weights, [clips["landscape"]], "127.0.0.1:9", "t", False, "cpu")
    assert not untracked.streams[0].analytics.tracks


def test_h264_clips_are_written_as_cameras_send_them_and_decode_frame_for_frame(tmp_path: Path) -> None:
    assert codec_available("h264"), "PyAV with libx264 is a dev dependency"
    path = _write_bench_clip(tmp_path / "clip.mp4", 160, 96, frames=25, fps=10.0, seed=1, codec="h264")
    capture = cv2.VideoCapture(str(path))
    fourcc = int(capture.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode()
    decoded = []
    while (read := capture.read())[0]:
        decoded.append(read[1])
    capture.release()
    assert fourcc in ("avc1", "h264") and len(decoded) == 25 and decoded[0].shape == (96, 160, 3)


def test_the_camera_sweep_paces_each_count_and_reports_throughput_drops_and_cpu_per_count(
        broker: EmbeddedBroker, model_weights: str, tmp_path: Path) -> None:
    options = BenchOptions(streams=2, frames=10, width=160, height=96, imgsz=160, batch=4, device="cpu",
                           codec="mpeg4", sweep=(1, 3), sweep_fps=10.0, sweep_seconds=1.5)
    replay = ReplayDetector("replay", "detect", "cpu", {0: "box"}, [_sample(0, [[1, 2, 3, 4]])])

    runs = measure_sweep(options, model_weights, "cpu", tmp_path, broker.bootstrap_servers,
                         detector_factory=lambda _c, _d: replay)

    assert [run.streams for run in runs] == [1, 3]
    for run in runs:
        assert run.frames >= (run.streams or 0) * 15 and run.dropped == 0
        assert 0.5 * (run.streams or 0) * 10 <= run.fps <= 1.5 * (run.streams or 0) * 10, "paced, not as fast as can be"
        assert run.cpu_cores is not None and run.cpu_cores > 0
    report = format_report(BenchReport({}, {"sweep_fps": 10.0, "runtime": "x", "batch": 4}, runs,
                                       {"vap_over_limit": 0, "vap_over_best_ultralytics": 0, "p99_budget_ms": 0}))
    table = report.splitlines()
    header = next(index for index, line in enumerate(table) if line.lstrip().startswith("cameras"))
    assert [line.split()[:2] for line in table[header + 1 : header + 3]] == [["1", "10"], ["3", "30"]]


def test_h265_clips_decode_frame_for_frame_and_gpu_runs_default_to_h264(tmp_path: Path) -> None:
    from pipeline.tools.bench import default_codec

    path = _write_bench_clip(tmp_path / "clip.mp4", 160, 96, frames=25, fps=10.0, seed=1, codec="h265")
    capture = cv2.VideoCapture(str(path))
    fourcc = int(capture.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode()
    decoded = 0
    while capture.read()[0]:
        decoded += 1
    capture.release()
    assert fourcc in ("hevc", "hev1", "hvc1") and decoded == 25
    assert default_codec("cuda:0") == "h264", "what cameras send, on a GPU box"
    assert default_codec("cpu") == "mpeg4", "as every earlier CPU run, so they stay comparable"


def test_the_limit_measured_around_vaps_run_counts_both_halves_and_says_how_far_they_drifted() -> None:
    before = Measurement("limit", frames=800, seconds=5.0, peak_rss_mb=900, batch_alone_ms=20.0, cpu_stolen=0.0,
                         notes="batch 4")
    after = Measurement("limit", frames=600, seconds=5.0, peak_rss_mb=950, batch_alone_ms=30.0, cpu_stolen=0.02)

    limit = bracketing(before, after)

    assert limit.fps == 140.0 and limit.peak_rss_mb == 950
    assert limit.batch_alone_ms == 20.0, "the p99 budget's unit comes from the first half"
    assert limit.cpu_stolen == 0.01
    assert "160.0 frames/s just before" in limit.notes and "120.0 just after it (-25%)" in limit.notes


def test_the_model_runtimes_share_is_its_cpu_over_all_of_a_runs_cpu() -> None:
    from pipeline.tools.cpu_account import NATIVE

    assert model_runtime_share({NATIVE: 6.0, "readers (decode)": 1.0, "publisher": 1.0}) == 0.75
    assert model_runtime_share({"readers (decode)": 1.0}) == 0.0 and model_runtime_share({}) == 0.0
