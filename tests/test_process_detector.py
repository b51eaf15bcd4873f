"""The model in a process of its own (`model.inference_process`): it finds what the model finds in vap's process,
a child that dies or hangs costs only the batches it held, and a pipeline running it accounts for every frame."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from pipeline.app import Pipeline
from pipeline.config import ModelConfig
from pipeline.errors import ModelMismatch
from pipeline.frames import Frame, FrameResult
from pipeline.inference import process_detector
from pipeline.inference.detector import UltralyticsDetector, infer
from pipeline.inference.process_detector import InferenceProcessFailed, ProcessDetector
from pipeline.ops.metrics import GpuCollector
from pipeline.tools.broker import EmbeddedBroker, free_port
from tests.conftest import (
    CLIP_FRAMES,
    ConfigFactory,
    assert_same_detections,
    metric_value,
    publish_clips,
    scrape,
    stop_with_sigterm,
    unused_topic,
    vap_process,
    wait_for,
    write_moving_box_clip,
)
from tests.fakes import scene_frames

REPO = Path(__file__).resolve().parent.parent
LOAD_S = 120  # a child imports the model library and loads the model: seconds on a busy 2-core machine


@pytest.fixture(scope="module")
def model_config(model_weights: str) -> ModelConfig:
    return ModelConfig(weights=model_weights, imgsz=160, device="cpu")


@pytest.fixture
def remote(model_config: ModelConfig) -> Iterator[ProcessDetector]:
    detector = ProcessDetector(model_config, "cpu", max_batch=4)
    yield detector
    detector.close()


def mixed_frames() -> list[Frame]:
    """Frames of two cameras of different sizes, so one batch carries pixels of both."""
    small, large = scene_frames(320, 180, 6, seed=3), scene_frames(640, 360, 6, seed=5)
    return [frame for pair in zip(small, large, strict=True) for frame in pair]


def assert_same_results(got: Sequence[FrameResult], expected: Sequence[FrameResult]) -> None:
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected, strict=True):
        assert ours.frame is theirs.frame and ours.task == theirs.task and ours.labels == theirs.labels
        assert np.array_equal(ours.detections.boxes_xyxy, theirs.detections.boxes_xyxy)
        assert np.array_equal(ours.detections.confidences, theirs.detections.confidences)
        assert np.array_equal(ours.detections.class_ids, theirs.detections.class_ids)
        assert len(ours.detections.polygons) == len(theirs.detections.polygons)
        for polygon, expected_polygon in zip(ours.detections.polygons, theirs.detections.polygons, strict=True):
            assert (polygon is None) == (expected_polygon is None)
            assert polygon is None or (expected_polygon is not None and np.array_equal(polygon, expected_polygon))


def infer_when_back(detector: ProcessDetector, frames: list[Frame]) -> list[FrameResult]:
    """The first batch the replacement takes: batches fail while it is due and while it loads."""
    deadline = time.monotonic() + LOAD_S
    while True:
        try:
            return infer(detector, frames)
        except InferenceProcessFailed:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_the_child_finds_what_the_model_finds_in_this_process_bit_for_bit(remote: ProcessDetector,
                                                                          model_config: ModelConfig) -> None:
    here = UltralyticsDetector(model_config, "cpu", max_batch=4)
    try:
        frames = mixed_frames()
        batches = [frames[start:start + 4] for start in range(0, len(frames), 4)]
        expected = [infer(here, batch) for batch in batches]
        in_flight = [remote.submit(batch) for batch in batches]  # three at once, as the inference worker holds
        got = [remote.collect(pending) for pending in in_flight]
    finally:
        here.close()
    for ours, theirs in zip(got, expected, strict=True):
        assert_same_results(ours, theirs)
    assert sum(len(result.detections) for batch in expected for result in batch) >= 12, "the scenes have shapes"
    assert any(polygon is not None for result in got[0] for polygon in result.detections.polygons)
    assert (remote.name, remote.task, remote.labels) == (here.name, here.task, here.labels)
    assert got[0][0].timings is not None and got[0][0].inference_ms > 0
    assert len(remote.pids) == 1 and remote.pids[0] != os.getpid()
    assert remote.device_peak_mb is None, "no GPU memory to report on the CPU"


def test_frames_held_as_tensors_off_the_gpu_are_copied_to_the_host_and_found_alike(remote: ProcessDetector) -> None:
    """Frames not in a NumPy array: a tensor a GPU decoded goes through CUDA IPC (checked on a GPU by
    `benchmarks/gpu_check.py`); any other tensor is copied to the host like an array."""
    frames = mixed_frames()[:4]
    expected = infer(remote, frames)
    as_tensors = [replace(frame, image=torch.from_numpy(frame.image)) for frame in frames]
    got = infer(remote, as_tensors)
    for ours, theirs in zip(got, expected, strict=True):
        assert np.array_equal(ours.detections.boxes_xyxy, theirs.detections.boxes_xyxy)
        assert np.array_equal(ours.detections.class_ids, theirs.detections.class_ids)
    assert all(result.frame is frame for result, frame in zip(got, as_tensors, strict=True))


def test_a_killed_child_loses_only_the_batches_it_held_and_is_replaced_warmed_up(
        remote: ProcessDetector, caplog: pytest.LogCaptureFixture) -> None:
    """The replacement warms up before its first batch, as its predecessor did (on a GPU a cold one would capture
    its CUDA graphs mid-stream)."""
    caplog.set_level(logging.INFO, logger="pipeline.inference.process_detector")
    remote.warmup([1, 4])
    frames = mixed_frames()[:4]
    expected = infer(remote, frames)
    first = remote.pids[0]
    held = remote.submit(frames)
    os.kill(first, signal.SIGKILL)

    with pytest.raises(InferenceProcessFailed, match=r"exited|closed its socket"):
        remote.collect(held)
    assert remote.replacements == 1
    assert_same_results(infer_when_back(remote, frames), expected)
    assert remote.pids and remote.pids[0] != first
    assert not os.path.exists(f"/proc/{first}")
    assert f"the model runs in process {remote.pids[0]} on cpu, warmed up for batches of 1, 4" in caplog.text


def test_a_child_that_stops_answering_is_replaced_after_the_reply_wait(remote: ProcessDetector,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    frames = mixed_frames()[:2]
    expected = infer(remote, frames)  # the first batch also compiles the model: longer than the wait below
    monkeypatch.setattr(process_detector, "_REPLY_S", 1.0)
    stuck = remote.pids[0]
    os.kill(stuck, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(InferenceProcessFailed, match="did not answer within 1 s"):
            infer(remote, frames)
        assert time.monotonic() - started < 5
    finally:
        with contextlib.suppress(ProcessLookupError):  # replaced: killed and reaped already
            os.kill(stuck, signal.SIGCONT)
    assert remote.replacements == 1
    monkeypatch.setattr(process_detector, "_REPLY_S", 60.0)
    assert_same_results(infer_when_back(remote, frames), expected)
    wait_for(lambda: not os.path.exists(f"/proc/{stuck}"), 10, "the stuck child should be gone")


def test_a_closed_detector_ends_its_child_and_takes_no_more_batches(remote: ProcessDetector) -> None:
    child = remote.pids[0]
    remote.close()
    assert remote.pids == []
    wait_for(lambda: not os.path.exists(f"/proc/{child}"), 10, "the child should end")
    with pytest.raises(InferenceProcessFailed, match="closed"):
        remote.submit(mixed_frames()[:1])


def test_closing_lets_the_batch_in_flight_come_back_first(remote: ProcessDetector) -> None:
    """The inference thread closes the detector as it stops, while the finisher may still wait for a batch."""
    frames = mixed_frames()[:4]
    expected = infer(remote, frames)
    pending = remote.submit(frames)
    closing = threading.Thread(target=remote.close, name="closing")
    closing.start()
    assert_same_results(remote.collect(pending), expected)
    closing.join(5)
    assert remote.pids == []


def test_a_model_the_child_cannot_load_fails_as_loading_it_here_does(model_config: ModelConfig,
                                                                     tmp_path: Path) -> None:
    missing = model_config.model_copy(update={"weights": str(tmp_path / "missing.pt")})
    with pytest.raises(RuntimeError, match=r"model\.weights: cannot load"):
        ProcessDetector(missing, "cpu")
    no_such_class = model_config.model_copy(update={"classes": ["unicorn"]})
    with pytest.raises(ModelMismatch, match="unicorn"):
        ProcessDetector(no_such_class, "cpu")


def test_a_pipeline_with_the_model_in_its_own_process_publishes_what_the_in_process_one_does(
        broker: EmbeddedBroker, clips: dict[str, Path], make_config: ConfigFactory) -> None:
    results = {}
    for own_process in (False, True):
        pipeline, results[own_process] = publish_clips(broker, clips, make_config, f"inference-process-{own_process}",
                                                       model={"inference_process": own_process})
        detector = pipeline.workers[0].detector
        assert isinstance(detector, ProcessDetector) == own_process
        if own_process:
            assert isinstance(detector, ProcessDetector) and detector.pids == [], "the child ends with vap"
    assert_same_detections(results[True], results[False], 2 * CLIP_FRAMES)


def test_a_pipeline_whose_inference_process_is_killed_drops_only_its_batches_and_counts_it(
        broker: EmbeddedBroker, tmp_path: Path, make_config: ConfigFactory) -> None:
    """SIGKILLed mid-run: the frames of the batches it held, and of those taken while its successor loads, are
    dropped as inference_error; every other frame is published, the stream goes on, and /metrics count it."""
    frames = 120
    clip = write_moving_box_clip(tmp_path / "clip.mp4", 320, 180, frames=frames)
    topic = unused_topic("inference-process-killed")
    config = make_config([{"id": "cam-a", "url": str(clip), "realtime": False}], broker.bootstrap_servers, topic,
                         model={"inference_process": True})
    pipeline = Pipeline(config)
    pipeline.start()
    try:
        assert pipeline.http is not None
        wait_for(lambda: pipeline.ledger.overall().published >= 5, 30, "frames should be published")
        killed = pipeline.helper_pids["inference processes"]
        assert len(killed) == 1
        os.kill(killed[0], signal.SIGKILL)
        published_at_kill = pipeline.ledger.overall().published
        assert pipeline.wait(duration_s=60) == "all sources finished"
        wait_for(lambda: pipeline.ledger.overall().in_flight == 0, 30, "every frame should be settled")
        metrics = scrape(pipeline.http.port)
        replacement = pipeline.helper_pids["inference processes"]
    finally:
        pipeline.stop()
    totals = pipeline.ledger.overall()
    dropped = metric_value(metrics, "vap_frames_dropped_total", stream="cam-a", reason="inference_error") or 0
    assert totals.read == frames and totals.published + dropped == frames and totals.dropped == dropped, totals
    assert totals.published > published_at_kill, "frames after the replacement loaded are published"
    assert metric_value(metrics, "vap_helper_replacements_total", kind="inference") == 1
    assert metric_value(metrics, "vap_helper_processes", kind="inference") == 1
    assert replacement and replacement != killed
    assert not os.path.exists(f"/proc/{replacement[0]}"), "the replacement ends with vap"


def test_the_child_ends_when_vap_is_killed_in_the_middle_of_batches(model_weights: str) -> None:
    """No orphan: SIGKILL gives vap no chance to say quit, and the child must see its socket close and go."""
    script = f"""
import sys
from pipeline.config import ModelConfig
from pipeline.inference.process_detector import ProcessDetector
from tests.fakes import scene_frames
detector = ProcessDetector(ModelConfig(weights={model_weights!r}, imgsz=160, device="cpu"), "cpu", max_batch=4)
frames = scene_frames(320, 180, 4, seed=3)
detector.collect(detector.submit(frames))
held = [detector.submit(frames) for _ in range(3)]
print(detector.pids[0], flush=True)
sys.stdin.read()
"""
    vap = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert vap.stdout is not None
        child = int(vap.stdout.readline())
        vap.kill()
        vap.wait(10)
        wait_for(lambda: not os.path.exists(f"/proc/{child}") or _is_zombie(child), 20,
                 "the child should end once vap is gone")
    finally:
        vap.kill()
        vap.wait(10)


def _is_zombie(pid: int) -> bool:
    """Ended, waiting for the init process to reap it (vap, its parent, is gone)."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    return True


def test_the_childs_polygon_workers_are_reported_and_their_replacements_outlive_the_child(
        model_config: ModelConfig) -> None:
    """vap's metrics and the bench's CPU accounting read a detector's `polygon_pool`; in the child's case, what
    its answers say. The CPU never starts polygon workers (its masks are not windows), so none run here."""
    detector = ProcessDetector(model_config.model_copy(update={"polygon_processes": 1}), "cpu", max_batch=4)
    try:
        pool = detector.polygon_pool
        assert pool is not None
        infer(detector, mixed_frames()[:4])
        assert (pool.pids, pool.replacements) == ([], 0)
    finally:
        detector.close()

    reported = process_detector._ChildPolygonWorkers()
    reported.reported([11, 12], 2)
    assert (reported.pids, reported.replacements) == ([11, 12], 2)
    reported.child_gone()
    reported.reported([13], 1)
    assert (reported.pids, reported.replacements) == ([13], 3), "the next child counts from zero"


def test_gpu_memory_counts_what_the_inference_processes_hold_beside_this_processs() -> None:
    """`vap_gpu_memory_bytes` is read where the model is: with it in a child, this process holds little."""
    child = SimpleNamespace(device="cuda:0", device_reserved_bytes=2e9, pids=[101], replacements=0)
    other_gpu = SimpleNamespace(device="cuda:1", device_reserved_bytes=1e9, pids=[102], replacements=0)
    no_gpu_memory = SimpleNamespace(pids=[103], replacements=0)
    collector = GpuCollector(lambda: {"inference processes": [child, other_gpu, child],
                                      "message processes": [no_gpu_memory]})
    assert collector._helpers_memory() == {"cuda:0": 4e9, "cuda:1": 1e9}
    assert GpuCollector()._helpers_memory() == {}


def test_sigterm_stops_vap_with_its_inference_process_within_10_s_and_leaves_no_child(
        tmp_path: Path, model_weights: str, broker: EmbeddedBroker) -> None:
    """The child ignores SIGTERM (as every helper does, so a service manager's signal to the whole group cannot
    end it before vap flushes through it); vap ends it within its stop budget."""
    port = free_port()
    clip = write_moving_box_clip(tmp_path / "clip.mp4", 96, 64, frames=20)
    config = tmp_path / "vap.yaml"
    config.write_text(yaml.safe_dump({
        "streams": [{"id": "file", "url": str(clip), "loop": True}],
        "model": {"weights": model_weights, "imgsz": 160, "inference_process": True},
        "batching": {"max_batch": 2},
        "kafka": {"bootstrap_servers": broker.bootstrap_servers, "topic": unused_topic("inference-process-sigterm")},
        "http": {"host": "127.0.0.1", "port": port},
    }), encoding="utf-8")
    with vap_process(["run", "-c", str(config)]) as vap:
        wait_for(lambda: (metric_value(scrape(port), "vap_helper_processes", kind="inference") or 0) == 1
                 and (metric_value(scrape(port), "vap_stage_seconds_count", stage="infer") or 0) > 0, 90,
                 "vap should infer through its inference process", ignore=(OSError,))
        children = [int(pid) for pid in Path(f"/proc/{vap.pid}/task/{vap.pid}/children").read_text().split()]
        assert children
        stop_with_sigterm(vap)
    wait_for(lambda: all(not os.path.exists(f"/proc/{pid}") or _is_zombie(pid) for pid in children), 10,
             "vap's children should end with it")
