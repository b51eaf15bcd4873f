"""Polygon workers (`model.polygon_processes`): a GPU batch's mask windows traced in worker processes give what
tracing them in the pipeline's process gives, and no batch depends on a worker being there."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import children
from pipeline.app import Pipeline
from pipeline.config import PipelineConfig
from pipeline.frames import Detections, frame_groups
from pipeline.inference import polygon_pool
from pipeline.inference.detector import UltralyticsDetector, infer
from pipeline.inference.polygon_pool import PolygonPool
from pipeline.inference.postprocess import BatchDetections, assemble, frame_detections, pack_mask_windows
from pipeline.inference.preprocess import Letterbox, plan_batch
from pipeline.tools.broker import EmbeddedBroker
from tests.conftest import CLIP_FRAMES, ConfigFactory, decode, read_topic, unused_topic, wait_for
from tests.fakes import scene_frames, stub_cuda_events

WORKER_START_S = 60  # a worker imports the model library before it is ready: seconds on a busy 2-core machine


def masks_batch(seed: int, frames: int = 6, per_frame: int = 5) -> tuple[BatchDetections, list[Letterbox]]:
    """Masks as a GPU hands them over (`pack_mask_windows`), from smooth random prototypes on letterboxed 16:9
    frames, with a frame that has no detection."""
    generator = torch.Generator().manual_seed(seed)
    plan = plan_batch([np.zeros((180, 320, 3), np.uint8)] * frames, 320, 32, True)
    input_h, input_w = plan[0].input_hw
    counts = [per_frame] * frames
    counts[1] = 0
    count = sum(counts)
    corners = torch.rand((count, 2), generator=generator) * torch.tensor([input_w, input_h]) - 8
    rows = torch.cat([corners, corners + 6 + torch.rand((count, 2), generator=generator) * 90,
                      torch.rand((count, 1), generator=generator), torch.zeros((count, 1)),
                      torch.randn((count, 32), generator=generator)], 1)
    image_index = torch.repeat_interleave(torch.arange(frames), torch.tensor(counts))
    protos = torch.nn.functional.avg_pool2d(
        torch.randn((frames, 32, input_h // 4 + 2, input_w // 4 + 2), generator=generator), 3, stride=1)
    return pack_mask_windows(assemble(rows, image_index, plan, protos, full_masks=True), plan), plan


def blank_masks_batch(frames: int = 3) -> tuple[BatchDetections, list[Letterbox]]:
    """Detections whose masks are empty everywhere: they have no outline, and every frame loses them."""
    plan = plan_batch([np.zeros((180, 320, 3), np.uint8)] * frames, 320, 32, True)
    input_h, input_w = plan[0].input_hw
    boxes = torch.tensor([[20.0, 30, 120, 140]]).repeat(frames, 1)
    rows = torch.cat([boxes, torch.full((frames, 1), 0.9), torch.zeros((frames, 1)), torch.ones((frames, 32))], 1)
    protos = -torch.ones((frames, 32, input_h // 4, input_w // 4))
    found = assemble(rows, torch.arange(frames), plan, protos, full_masks=True)
    return pack_mask_windows(found, plan), plan


def assert_same(got: Sequence[Detections], expected: Sequence[Detections]) -> None:
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected, strict=True):
        np.testing.assert_array_equal(ours.boxes_xyxy, theirs.boxes_xyxy)
        np.testing.assert_array_equal(ours.confidences, theirs.confidences)
        np.testing.assert_array_equal(ours.class_ids, theirs.class_ids)
        assert len(ours.polygons) == len(theirs.polygons)
        for polygon, expected_polygon in zip(ours.polygons, theirs.polygons, strict=True):
            np.testing.assert_array_equal(polygon, expected_polygon)


def traced_in_workers(pool: PolygonPool, found: BatchDetections, plan: list[Letterbox],
                      workers: int) -> list[Detections]:
    """The first batch that `workers` workers trace (the ones before it are traced here while they start)."""
    answers: list[list[Detections]] = []

    def workers_took_it() -> bool:
        before = pool.batches_in_workers
        answers.append(pool.frame_detections(found, plan))
        return pool.batches_in_workers > before and pool.ready_workers == workers

    wait_for(workers_took_it, WORKER_START_S, f"{workers} polygon workers should start and take a batch")
    return answers[-1]


@pytest.fixture
def pool() -> Iterator[PolygonPool]:
    pool = PolygonPool(2)
    yield pool
    pool.close()


def test_workers_trace_what_the_pipelines_process_traces_bit_for_bit(pool: PolygonPool) -> None:
    found, plan = masks_batch(seed=5)
    expected = frame_detections(found, plan)

    got = traced_in_workers(pool, found, plan, workers=2)

    assert sum(len(detections.polygons) for detections in expected) >= 15, "most masks should have outlines"
    assert len(expected[1]) == 0
    assert_same(got, expected)
    assert len(pool.pids) == 2


def test_batches_with_nothing_to_outline_give_empty_frames_and_leave_the_workers_alone(pool: PolygonPool) -> None:
    """Most batches of most cameras find nothing; each such batch once cost a worker its life."""
    found, plan = masks_batch(seed=3)
    traced_in_workers(pool, found, plan, workers=2)
    workers = pool.pids
    no_detections, no_detections_plan = masks_batch(seed=4, per_frame=0)
    blank, blank_plan = blank_masks_batch()

    in_workers = pool.batches_in_workers
    assert_same(pool.frame_detections(no_detections, no_detections_plan), [Detections.empty()] * 6)
    assert pool.batches_in_workers == in_workers, "a batch without detections has nothing to send"
    assert_same(pool.frame_detections(blank, blank_plan), [Detections.empty()] * 3)
    assert pool.batches_in_workers == in_workers + 1, "masks to outline go to the workers, even blank ones"

    assert pool.pids == workers
    assert_same(pool.frame_detections(found, plan), frame_detections(found, plan))
    assert pool.pids == workers and pool.batches_in_workers == in_workers + 2


def test_a_batch_whose_masks_are_not_windows_is_traced_here_and_starts_no_worker(pool: PolygonPool) -> None:
    """The CPU's masks come as logits, traced as they are upsampled: nothing for a worker to do."""
    generator = torch.Generator().manual_seed(2)
    plan = plan_batch([np.zeros((180, 320, 3), np.uint8)] * 2, 320, 32, True)
    rows = torch.cat([torch.tensor([[20.0, 30, 120, 140], [50, 60, 200, 150]]), torch.tensor([[0.9, 0], [0.8, 0]]),
                      torch.randn((2, 32), generator=generator)], 1)
    protos = torch.randn((2, 32, 48, 80), generator=generator)
    found = assemble(rows, torch.tensor([0, 1]), plan, protos, full_masks=False)

    assert_same(pool.frame_detections(found, plan), frame_detections(found, plan))
    assert pool.pids == [] and pool.batches_here == 1


def test_a_killed_worker_costs_no_batch_and_is_replaced(pool: PolygonPool) -> None:
    found, plan = masks_batch(seed=8)
    expected = frame_detections(found, plan)
    traced_in_workers(pool, found, plan, workers=2)
    killed = pool.pids[0]

    os.kill(killed, signal.SIGKILL)
    assert_same(pool.frame_detections(found, plan), expected)  # traced by the other worker and here

    assert_same(traced_in_workers(pool, found, plan, workers=2), expected)
    assert killed not in pool.pids and len(pool.pids) == 2 and pool.replacements == 1


def test_a_worker_that_stops_answering_is_replaced_after_the_reply_wait(pool: PolygonPool,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(polygon_pool, "_REPLY_S", 0.5)
    found, plan = masks_batch(seed=9)
    expected = frame_detections(found, plan)
    traced_in_workers(pool, found, plan, workers=2)
    stuck = pool.pids[1]

    os.kill(stuck, signal.SIGSTOP)
    try:
        assert_same(pool.frame_detections(found, plan), expected)
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already if it was replaced
            os.kill(stuck, signal.SIGCONT)

    assert stuck not in pool.pids and pool.replacements == 1
    assert_same(traced_in_workers(pool, found, plan, workers=2), expected)


def test_a_worker_that_never_gets_ready_is_replaced(pool: PolygonPool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(children, "_START_S", 1.0)
    found, plan = masks_batch(seed=10)
    expected = frame_detections(found, plan)
    assert_same(pool.frame_detections(found, plan), expected)  # starts the workers; traced here meanwhile
    stuck = pool.pids[0]
    os.kill(stuck, signal.SIGSTOP)  # long before its imports are done
    try:
        wait_for(lambda: pool.frame_detections(found, plan) is not None and stuck not in pool.pids, 10,
                 "a worker not ready in time should be replaced")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stuck, signal.SIGCONT)

    monkeypatch.setattr(children, "_START_S", 60.0)  # 1 s is too short for a healthy worker on a busy machine
    assert_same(traced_in_workers(pool, found, plan, workers=2), expected)


def test_a_closed_pool_stops_its_workers_and_leaves_batches_to_its_caller(pool: PolygonPool) -> None:
    found, plan = masks_batch(seed=11)
    traced_in_workers(pool, found, plan, workers=2)
    workers = pool.pids

    pool.close()

    for pid in workers:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # already reaped: the pool waited for its end
    before = pool.batches_here
    assert_same(pool.frame_detections(found, plan), frame_detections(found, plan))
    assert pool.batches_here == before + 1 and pool.pids == []


@pytest.mark.parametrize(("per_frame", "groups"), [
    ([3, 0, 5, 1], 2), ([1] * 16, 4), ([0, 0, 9, 0], 3), ([0, 0, 0], 2), ([2, 2], 8), ([7], 3), ([], 2),
])
def test_frame_groups_are_runs_of_whole_frames_with_about_equal_detections(per_frame: list[int],
                                                                          groups: int) -> None:
    counts = np.array(per_frame, np.int64)

    runs = frame_groups(counts, groups)

    edges = [edge for run in runs for edge in run]
    assert edges[:1] == [0][:len(edges)] and edges[-1:] == [len(per_frame)][:len(edges)]
    assert edges[1:-1:2] == edges[2:-1:2], "each run starts where the one before ended"
    assert all(first < end for first, end in runs) and len(runs) <= groups
    if len(per_frame) >= groups and counts.sum() >= 4 * groups and (counts > 0).all():
        loads = [int(counts[first:end].sum()) for first, end in runs]
        assert max(loads) - min(loads) <= 2 * counts.max()


def test_a_pipeline_on_the_gpu_path_with_polygon_workers_publishes_what_the_cpu_path_does_and_ends_them(
        broker: EmbeddedBroker, clips: dict[str, Path], make_config: ConfigFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path after the device (whole masks, windows handed over, NMS on the finisher, polygons in worker
    processes) run on the CPU with CUDA's events stubbed, through a whole pipeline and a real broker: every frame
    published, the detections of the CPU path, and no worker left once the pipeline has stopped."""
    stub_cuda_events(monkeypatch)
    pools: list[PolygonPool] = []

    def gpu_like(config: PipelineConfig, _device: str) -> UltralyticsDetector:
        detector = UltralyticsDetector(config.model, "cpu", config.batching.max_batch)
        detector._cuda = True
        pool = detector.polygon_pool
        assert pool is not None
        frames = scene_frames(320, 180, config.batching.max_batch, seed=3)
        wait_for(lambda: infer(detector, frames) and pool.batches_in_workers > 0, WORKER_START_S,
                 "the polygon workers should start and take a batch before the streams do")
        pools.append(pool)
        return detector

    streams = [{"id": f"cam-{name}", "url": str(path), "realtime": False} for name, path in clips.items()]
    published = {}
    for way in ("cpu", "gpu-like"):
        topic = unused_topic(f"polygons-{way}")
        config = make_config(streams, broker.bootstrap_servers, topic, model={"polygon_processes": 2})
        pipeline = Pipeline(config, detector_factory=gpu_like if way == "gpu-like" else None)
        pipeline.start()
        try:
            assert pipeline.wait(duration_s=60) == "all sources finished"
            workers = pipeline.helper_pids["polygon processes"]
        finally:
            pipeline.stop()
        totals = pipeline.ledger.overall()
        assert totals.read == totals.published == 2 * CLIP_FRAMES and totals.in_flight == 0
        published[way] = {(message["stream_id"], message["frame_id"]): message["detections"] for message in
                          map(decode, read_topic(broker.bootstrap_servers, topic, 2 * CLIP_FRAMES))}
        if way == "cpu":
            assert workers == [], "the CPU's masks never reach polygon workers"
        else:
            assert len(workers) == 2 and pools[0].batches_in_workers > 1, "the streams' batches went to the workers"
            assert not any(os.path.exists(f"/proc/{pid}") for pid in workers), "the workers end with the pipeline"

    assert published["gpu-like"].keys() == published["cpu"].keys() and len(published["cpu"]) == 2 * CLIP_FRAMES
    masks = 0
    for frame, expected in published["cpu"].items():
        got = published["gpu-like"][frame]
        assert [(d["label"], d["mask"] is not None) for d in got] == [(d["label"], d["mask"] is not None)
                                                                    for d in expected], frame
        for ours, theirs in zip(got, expected, strict=True):  # batches formed differently differ in the last bits
            assert np.allclose(list(ours["bbox"].values()), list(theirs["bbox"].values()), atol=0.5), frame
            masks += theirs["mask"] is not None
    assert masks >= CLIP_FRAMES, "the clips have things to find"
