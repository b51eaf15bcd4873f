"""Inference-stage semantics: batching does not change answers, and results go back to their own frame."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.batching.hub import FrameHub, OverflowPolicy
from pipeline.config import BatchingConfig, ModelConfig
from pipeline.frames import Detections, Frame, FrameResult
from pipeline.inference.detector import UltralyticsDetector, infer
from pipeline.inference.worker import InferenceWorker
from pipeline.tools.synth.world import SceneSpec, render_scene
from tests.conftest import wait_for
from tests.fakes import Stages, make_frame, scene_frames, stub_cuda_events


class ContentReadingDetector:
    """Reports one box whose x1 encodes the frame's pixel value, so a misrouted result is visible."""

    name = "content-reader"
    task = "detect"
    device = "cpu"
    runtime = "python"
    labels = {0: "marker"}

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        pass

    def submit(self, frames: Sequence[Frame]) -> Sequence[Frame]:
        return frames

    def close(self) -> None:
        pass

    def collect(self, frames: Sequence[Frame]) -> list[FrameResult]:
        shuffled = list(reversed(frames))
        answers = {id(frame): float(frame.image[0, 0, 0]) for frame in shuffled}
        return [
            FrameResult(
                frame=frame,
                task=self.task,
                detections=Detections(
                    boxes_xyxy=np.array([[answers[id(frame)], 0, 1, 1]], np.float32),
                    confidences=np.ones(1, np.float32),
                    class_ids=np.zeros(1, np.int64),
                ),
                labels={0: "marker"},
            )
            for frame in frames
        ]


def marked_frame(stream_index: int, frame_id: int, stages: Stages | None = None) -> Frame:
    stream_id = f"s{stream_index}"
    frame = make_frame(stream_id, frame_id) if stages is None else stages.frame(stream_id, frame_id)
    frame.image[0, 0, 0] = (stream_index * 50 + frame_id) % 256
    return frame


def waiting_hub(streams: int, workers: int = 1) -> FrameHub:
    """A hub whose streams `s0`, `s1`, ... wait rather than drop, so every frame fed reaches a worker."""
    hub = FrameHub(workers=workers)
    for stream_index in range(streams):
        hub.add_stream(f"s{stream_index}", 100, OverflowPolicy.WAIT)
    return hub


def run_workers(workers: list[InferenceWorker], hub: FrameHub, streams: int, frames: int,
                delivered: list[FrameResult], expected: int | None = None, stages: Stages | None = None) -> None:
    """Feed `frames` marked frames per stream through the workers, wait for `expected` results (every
    frame's by default), stop them."""
    stop = threading.Event()
    for worker in workers:
        worker.start()
    for frame_id in range(frames):
        for stream_index in range(streams):
            hub.put(marked_frame(stream_index, frame_id, stages), stop)
    deadline = time.monotonic() + 10
    while len(delivered) < (streams * frames if expected is None else expected) and time.monotonic() < deadline:
        time.sleep(0.01)
    for worker in workers:
        worker.stop()
    assert all(worker.join(5) for worker in workers)


def assert_routed_in_order(delivered: list[FrameResult], streams: int, frames: int) -> None:
    assert len(delivered) == streams * frames
    for result in delivered:
        stream_index = int(result.frame.stream_id[1:])
        assert result.detections.boxes_xyxy[0, 0] == (stream_index * 50 + result.frame.frame_id) % 256
    for stream_index in range(streams):
        ids = [r.frame.frame_id for r in delivered if r.frame.stream_id == f"s{stream_index}"]
        assert ids == list(range(frames))


def test_worker_routes_each_result_to_its_own_stream_and_frame() -> None:
    stages = Stages()
    metrics = stages.metrics
    hub = waiting_hub(3)
    delivered: list[FrameResult] = []
    worker = InferenceWorker(ContentReadingDetector(), hub, BatchingConfig(max_batch=5, max_wait_ms=5),
                             delivered.extend, stages.ledger, metrics,
                             stages.heartbeats)
    run_workers([worker], hub, 3, 20, delivered, stages=stages)
    assert_routed_in_order(delivered, 3, 20)


@pytest.fixture(scope="module")
def detector(model_weights: str) -> UltralyticsDetector:
    return UltralyticsDetector(ModelConfig(weights=model_weights, imgsz=320, conf=0.25), "cpu")


def test_a_batch_of_eight_gives_the_same_detections_as_eight_single_frames(detector: UltralyticsDetector) -> None:
    scene = render_scene(SceneSpec(width=480, height=320, n_frames=8, seed=4242))
    frames = [replace(make_frame("s", index), image=image) for index, (image, _) in enumerate(scene)]
    batched = infer(detector, frames)
    singles = [infer(detector, [frame])[0] for frame in frames]
    assert sum(len(result.detections) for result in batched) >= 8, "the bundled model should see the shapes"
    for together, alone in zip(batched, singles, strict=True):
        assert together.frame is alone.frame
        assert len(together.detections) == len(alone.detections)
        np.testing.assert_allclose(together.detections.boxes_xyxy, alone.detections.boxes_xyxy, atol=0.5)
        np.testing.assert_array_equal(together.detections.class_ids, alone.detections.class_ids)
        np.testing.assert_allclose(together.detections.confidences, alone.detections.confidences, atol=1e-3)


def test_with_conf_zero_masks_are_built_only_for_the_300_rows_each_frame_publishes(
        model_weights: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.inference.postprocess import BatchDetections, assemble

    assembled: list[list[int]] = []

    def counting(rows: Any, image_index: Any, plan: Any, protos: Any, full_masks: bool = True) -> BatchDetections:
        assembled.append(image_index.bincount(minlength=len(plan)).tolist())
        return assemble(rows, image_index, plan, protos, full_masks)

    monkeypatch.setattr("pipeline.inference.detector.assemble", counting)
    detector = UltralyticsDetector(ModelConfig(weights=model_weights, imgsz=320, conf=0.0), "cpu", 2)
    results = infer(detector, scene_frames(480, 320, 2, seed=5))
    assert assembled and all(0 < count <= 300 for count in assembled[0]), assembled
    assert max(assembled[0]) == 300, "conf 0 should leave more rows than the cap"
    assert all(len(result.detections) <= 300 for result in results)


class SlowContentReadingDetector(ContentReadingDetector):
    """Takes a little time per batch, so two workers genuinely run at once."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.batches = 0

    def collect(self, frames: Sequence[Frame]) -> list[FrameResult]:
        time.sleep(0.01)
        self.batches += 1
        return super().collect(frames)


def test_two_device_workers_share_the_streams_and_keep_each_stream_in_order() -> None:
    stages = Stages()
    metrics = stages.metrics
    hub = waiting_hub(4, workers=2)
    delivered: list[FrameResult] = []
    lock = threading.Lock()

    def deliver(results: list[FrameResult]) -> None:
        with lock:
            delivered.extend(results)

    detectors = [SlowContentReadingDetector("dev0"), SlowContentReadingDetector("dev1")]
    workers = [InferenceWorker(d, hub, BatchingConfig(max_batch=3, max_wait_ms=1), deliver, stages.ledger, metrics,
                               stages.heartbeats, index) for index, d in enumerate(detectors)]
    run_workers(workers, hub, 4, 30, delivered, stages=stages)
    assert all(d.batches > 0 for d in detectors), [d.batches for d in detectors]
    assert_routed_in_order(delivered, 4, 30)


def test_a_batch_the_next_stage_cannot_take_is_dropped_and_the_later_ones_still_flow() -> None:
    stages = Stages()
    metrics = stages.metrics
    hub = waiting_hub(2)
    delivered: list[FrameResult] = []
    refused: list[FrameResult] = []

    def deliver(results: list[FrameResult]) -> None:
        if any(result.frame.stream_id == "s1" and result.frame.frame_id % 5 == 0 for result in results):
            refused.extend(results)
            raise RuntimeError("analytics failed")
        delivered.extend(results)

    worker = InferenceWorker(ContentReadingDetector(), hub, BatchingConfig(max_batch=4, max_wait_ms=5), deliver,
                             stages.ledger, metrics, stages.heartbeats)
    worker.start()
    for frame_id in range(20):
        for stream_index in range(2):
            hub.put(marked_frame(stream_index, frame_id, stages), threading.Event())
    wait_for(lambda: len(delivered) + len(refused) == 40, 10, "every frame should reach the next stage")
    worker.stop()
    assert worker.join(5)

    assert len(refused) >= 4
    for stream in ("s0", "s1"):
        assert stages.dropped(stream, "analytics_error") == sum(r.frame.stream_id == stream for r in refused), \
            "each lost result is counted against its own stream"
        ids = [r.frame.frame_id for r in delivered if r.frame.stream_id == stream]
        assert ids == sorted(ids)
    assert metrics.registry.get_sample_value("vap_inference_errors_total", {"device": "cpu"}) is None, \
        "the model did not fail"
    assert hub.drained()


class FailingFirstBatchDetector(ContentReadingDetector):
    def submit(self, frames: Sequence[Frame]) -> Sequence[Frame]:
        if frames[0].frame_id == 0:
            raise RuntimeError("the model failed on this batch")
        return frames


def test_the_frames_of_a_batch_the_model_fails_on_are_counted_as_dropped_per_stream() -> None:
    stages = Stages()
    metrics = stages.metrics
    hub = waiting_hub(1)
    delivered: list[FrameResult] = []
    worker = InferenceWorker(FailingFirstBatchDetector(), hub, BatchingConfig(max_batch=2, max_wait_ms=50),
                             delivered.extend, stages.ledger, metrics,
                             stages.heartbeats)
    run_workers([worker], hub, 1, 10, delivered, expected=8, stages=stages)
    lost = metrics.registry.get_sample_value("vap_frames_dropped_total", {"stream": "s0", "reason": "inference_error"})
    assert lost == 10 - len(delivered) == 2
    assert metrics.registry.get_sample_value("vap_inference_errors_total", {"device": "cpu"}) == 1


class FinisherKiller(BaseException):
    """Not an Exception, so nothing in the finisher catches it: the thread dies as on an interpreter fault."""


class DyingFinisherDetector(ContentReadingDetector):
    def __init__(self) -> None:
        self.collected: list[int] = []
        self.submitted = 0

    def submit(self, frames: Sequence[Frame]) -> Sequence[Frame]:
        self.submitted += 1
        return frames

    def collect(self, frames: Sequence[Frame]) -> list[FrameResult]:
        self.collected.append(frames[0].frame_id)
        if len(self.collected) == 1:
            time.sleep(0.3)  # the next batch is submitted and waits for the hand-over meanwhile
            raise FinisherKiller
        return super().collect(frames)


def test_when_the_finisher_dies_the_waiting_batch_is_released_and_the_worker_stops(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threading, "excepthook", lambda args: None)
    stages = Stages()
    metrics = stages.metrics
    hub = waiting_hub(1)
    detector = DyingFinisherDetector()
    worker = InferenceWorker(detector, hub, BatchingConfig(max_batch=2, max_wait_ms=1), lambda results: None,
                             stages.ledger, metrics, stages.heartbeats)
    stop = threading.Event()
    for frame_id in range(10):
        hub.put(marked_frame(0, frame_id, stages), stop)
    worker.start()
    assert worker.join(5), "the inference thread kept waiting for a finisher that is gone"
    assert detector.submitted == 3  # the dying batch, the one handed over behind it, the one waiting
    assert detector.collected == [0, 2, 4], "a batch the finisher never took kept what it held"
    assert metrics.registry.get_sample_value("vap_inference_errors_total", {"device": "cpu"}) == 2
    lost = {"stream": "s0", "reason": "inference_error"}
    abandoned = metrics.registry.get_sample_value("vap_frames_dropped_total", lost)
    assert abandoned == 4, "the two abandoned batches' frames are counted"


def test_device_names_resolve_to_one_spelling_and_auto_falls_back_to_cpu() -> None:
    import torch

    from pipeline.inference.devices import resolve_devices

    assert resolve_devices(["cpu", "cpu"]) == ["cpu", "cpu"]
    if torch.cuda.is_available():
        assert resolve_devices("0") == ["cuda:0"]
        assert resolve_devices("cuda") == ["cuda:0"]
    else:
        assert resolve_devices("auto") == ["cpu"]
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_devices("0")
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_devices(["cuda:0", "cuda:1"])


def test_a_classify_model_publishes_only_the_classes_kept_by_model_classes() -> None:
    config = ModelConfig(weights="yolo11n-cls.yaml", imgsz=64, conf=0.0, classes=[0, 1], runtime="torch")
    classifier = UltralyticsDetector(config, "cpu")
    assert classifier.task == "classify" and len(classifier.labels) > 5
    frames = [replace(make_frame("s", index, 96, 64), image=np.full((64, 96, 3), 40 * index, np.uint8))
              for index in range(3)]
    published = [entry.class_id for result in infer(classifier, frames) for entry in result.classes]
    assert published and set(published) <= {0, 1}


def test_an_empty_class_filter_publishes_no_classes_rather_than_failing() -> None:
    config = ModelConfig(weights="yolo11n-cls.yaml", imgsz=64, conf=0.0, classes=[0], runtime="torch")
    classifier = UltralyticsDetector(config.model_copy(update={"classes": []}), "cpu")
    results = infer(classifier, [make_frame("s", 0, 96, 64)])
    assert [result.classes for result in results] == [()]


def test_a_class_id_the_model_does_not_have_is_a_startup_error_naming_the_key_and_its_classes(
        detector: UltralyticsDetector, model_weights: str) -> None:
    unknown = max(detector.labels) + 5
    with pytest.raises(ValueError, match=rf"model\.classes: {unknown} is not a class") as raised:
        UltralyticsDetector(ModelConfig(weights=model_weights, imgsz=320, classes=[0, unknown]), "cpu")
    assert detector.labels[0] in str(raised.value)


def test_weights_that_cannot_be_loaded_are_a_startup_error_naming_the_key(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model.pt"
    with pytest.raises(RuntimeError, match=r"model\.weights: cannot load .*no-such-model\.pt"):
        UltralyticsDetector(ModelConfig(weights=str(missing)), "cpu", 1)


class CurrentDeviceRecordingDetector(ContentReadingDetector):
    """Notes the current CUDA device of the thread each call runs on, as a TensorRT context would use it."""

    def __init__(self, device: str, current: threading.local) -> None:
        self.device = device
        self._current = current
        self.seen: list[tuple[str, str, str | None]] = []

    def submit(self, frames: Sequence[Frame]) -> Sequence[Frame]:
        self.seen.append(("submit", threading.current_thread().name, getattr(self._current, "device", None)))
        return frames

    def collect(self, frames: Sequence[Frame]) -> list[FrameResult]:
        self.seen.append(("collect", threading.current_thread().name, getattr(self._current, "device", None)))
        return super().collect(frames)


@pytest.mark.parametrize("device", ["cuda:1", "cpu"])
def test_worker_threads_run_the_model_on_their_own_device(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    current = threading.local()

    def set_device(chosen: torch.device) -> None:
        assert chosen.type == "cuda", "only a CUDA worker selects a device"
        current.device = str(chosen)

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    stages = Stages()
    metrics = stages.metrics
    hub = waiting_hub(1)
    delivered: list[FrameResult] = []
    detector = CurrentDeviceRecordingDetector(device, current)
    worker = InferenceWorker(detector, hub, BatchingConfig(max_batch=2, max_wait_ms=5), delivered.extend,
                             stages.ledger, metrics, stages.heartbeats)
    run_workers([worker], hub, 1, 4, delivered, stages=stages)
    assert {(call, thread) for call, thread, _ in detector.seen} == {("submit", f"infer-{device}"),
                                                                      ("collect", f"finish-{device}")}
    expected = device if device.startswith("cuda") else None
    assert {current_device for _, _, current_device in detector.seen} == {expected}


@pytest.mark.parametrize("polygon_processes", [0, 2])
def test_the_gpu_paths_post_processing_gives_the_cpu_paths_detections_from_mask_windows_alone(
        model_weights: str, monkeypatch: pytest.MonkeyPatch, polygon_processes: int) -> None:
    """The CUDA branch after the forward pass (whole masks on the device, only each mask's window copied to the
    host, outlines traced from those, in the pipeline's process or in polygon workers) run on the CPU with CUDA's
    events stubbed: no GPU runs this suite, so this is that branch's test. Same letterbox and model as the CPU's
    path, so the same boxes and polygons."""

    import pipeline.inference.detector as detector_module
    from pipeline.inference import postprocess

    config = ModelConfig(weights=model_weights, imgsz=320, conf=0.25, runtime="torch", cuda_graphs=False)
    cpu = UltralyticsDetector(config, "cpu")
    gpu_like = UltralyticsDetector(config.model_copy(update={"polygon_processes": polygon_processes}), "cpu")
    gpu_like._cuda = True
    stub_cuda_events(monkeypatch)
    packed: list[Any] = []

    def pack_and_keep(found: Any, plan: Any) -> Any:
        packed.append(postprocess.pack_mask_windows(found, plan))
        return packed[-1]

    monkeypatch.setattr(detector_module, "pack_mask_windows", pack_and_keep)
    scene = render_scene(SceneSpec(width=480, height=320, n_frames=4, seed=4242))
    frames = [replace(make_frame("s", index), image=image) for index, (image, _) in enumerate(scene)]

    expected, got = infer(cpu, frames), infer(gpu_like, frames)
    pool = gpu_like.polygon_pool
    workers = [] if pool is None else pool.pids
    if pool is not None:  # the first batch started the workers and was traced here, while they started

        def traced_by_the_workers() -> bool:
            got[:] = infer(gpu_like, frames)
            return pool.batches_in_workers > 0

        wait_for(traced_by_the_workers, 60, "the polygon workers should start and trace a batch")
        assert len(workers) == polygon_processes
    gpu_like.close()

    assert all(packed_found.masks is None and packed_found.mask_pixels is not None for packed_found in packed)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers), "closing the detector ends its workers"
    assert sum(len(result.detections.polygons) for result in expected) >= 4, "the bundled model should see shapes"
    for theirs, ours in zip(expected, got, strict=True):
        np.testing.assert_array_equal(ours.detections.boxes_xyxy, theirs.detections.boxes_xyxy)
        assert len(ours.detections.polygons) == len(theirs.detections.polygons)
        for polygon, expected_polygon in zip(ours.detections.polygons, theirs.detections.polygons, strict=True):
            np.testing.assert_array_equal(polygon, expected_polygon)


class _StaticOutputs:
    """A CUDA graph's habit, on the CPU: every call returns the same output memory, overwritten by the next."""

    def __init__(self, forward: Any) -> None:
        self._forward = forward
        self._static: Any = None

    def __call__(self, batch: Any) -> Any:
        fresh = self._forward(batch)
        self._static = _overwritten(self._static, fresh)
        return self._static


def _overwritten(static: Any, fresh: Any) -> Any:
    import torch

    if isinstance(fresh, torch.Tensor):
        return fresh.clone() if static is None else static.copy_(fresh)
    if isinstance(fresh, (tuple, list)):
        return type(fresh)(_overwritten(None if static is None else old, new)
                           for old, new in zip(static or [None] * len(fresh), fresh, strict=True))
    return fresh


def test_on_a_gpu_a_batch_queued_before_the_last_is_collected_leaves_the_last_ones_results_alone(
        model_weights: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The inference thread queues the next batch before the finisher collects the last, and on a GPU the
    finisher runs NMS and masks only then: on outputs a CUDA graph's next replay has overwritten, unless they
    were copied. Run on the CPU with CUDA's events stubbed and a forward pass that, like a graph, reuses its
    output memory."""

    config = ModelConfig(weights=model_weights, imgsz=320, conf=0.25, runtime="torch", cuda_graphs=False)
    cpu, gpu_like = UltralyticsDetector(config, "cpu", max_batch=3), UltralyticsDetector(config, "cpu", max_batch=3)
    gpu_like._cuda = True
    gpu_like._graphed = _StaticOutputs(gpu_like._ensure_backend())  # type: ignore[assignment]
    stub_cuda_events(monkeypatch)
    first, second = scene_frames(480, 320, 3, seed=31), scene_frames(480, 320, 3, seed=32)
    expected = [infer(cpu, first), infer(cpu, second)]

    first_pending = gpu_like.submit(first)
    second_pending = gpu_like.submit(second)
    got = [gpu_like.collect(first_pending), gpu_like.collect(second_pending)]

    assert sum(len(result.detections) for result in expected[0]) != sum(len(result.detections)
                                                                         for result in expected[1]) or any(
        not np.array_equal(a.detections.boxes_xyxy, b.detections.boxes_xyxy)
        for a, b in zip(expected[0], expected[1], strict=True)), "the two batches should see different things"
    for expected_batch, got_batch in zip(expected, got, strict=True):
        for theirs, ours in zip(expected_batch, got_batch, strict=True):
            np.testing.assert_array_equal(ours.detections.boxes_xyxy, theirs.detections.boxes_xyxy)
            assert len(ours.detections.polygons) == len(theirs.detections.polygons)
