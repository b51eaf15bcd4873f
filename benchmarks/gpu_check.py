"""Does vap's GPU path give the right detections? A correctness check to run before timing anything on a GPU.

The GPU path has parts the CPU test suite can only run with CUDA stubbed, or not at all: CUDA graphs, NMS and
masks on the finisher thread while the next batch is already queued, only each mask's window copied to the
host, polygon workers, and the model in a process of its own taking frames on the GPU through CUDA IPC. Each
configuration below runs the bundled segmentation model on the synthetic scenes, with batches queued two at a
time as the inference worker does, and is compared with the plainest GPU path
(no graph, one batch at a time, polygons traced in-process) and, loosely, with the CPU.

    python benchmarks/gpu_check.py [--device cuda:0] [--json OUT.json]

Exit status 0 when every check passes, 1 otherwise. `benchmarks/gpu_sweep.sh check OUT_DIR` runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ModelConfig
from pipeline.frames import Detections, Frame, FrameResult
from pipeline.inference.detector import Detector, UltralyticsDetector, infer
from pipeline.inference.process_detector import ProcessDetector
from pipeline.tools.demo import SHIPPED_WEIGHTS
from pipeline.tools.synth.world import SceneSpec, render_scene

_BATCH = 8
_BOX_TOLERANCE_PX = 1.0  # CUDA graphs against eager: the same kernels, in another order
_CPU_BOX_TOLERANCE_PX = 4.0  # FP16 on the GPU against FP32 on the CPU


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


def scene_batches(batches: int) -> list[list[Frame]]:
    """1280x720 frames of the shapes world (what the bundled model was trained on), a few batches of them, and
    second a batch of blank frames: most batches of a quiet camera find nothing, and that path must hold too."""
    images = [image for image, _ in render_scene(SceneSpec(width=1280, height=720, n_frames=batches * _BATCH,
                                                           seed=77))]
    images[_BATCH:_BATCH] = [np.full((720, 1280, 3), 114, np.uint8)] * _BATCH
    now = time.monotonic()
    frames = [Frame("check", index, None, datetime.now(timezone.utc), now, image) for index, image in enumerate(images)]
    return [frames[start:start + _BATCH] for start in range(0, len(frames), _BATCH)]


def run_overlapped(detector: Detector, batches: Sequence[list[Frame]]) -> list[list[FrameResult]]:
    """Each batch queued before the previous one is collected, as the inference worker's two threads do."""
    results: list[list[FrameResult]] = []
    pending: Any = None
    for batch in batches:
        queued = detector.submit(batch)
        if pending is not None:
            results.append(detector.collect(pending))
        pending = queued
    results.append(detector.collect(pending))
    return results


def compare(name: str, expected: Sequence[Sequence[FrameResult]], got: Sequence[Sequence[FrameResult]],
            tolerance_px: float, exact_counts: bool) -> Check:
    """Frame by frame: the same number of detections (or within one, across precisions), boxes within the
    tolerance, and an outline for every detection that had one."""
    problems: list[str] = []
    detections = outlines = 0
    for batch_index, (expected_batch, got_batch) in enumerate(zip(expected, got, strict=True)):
        for frame_index, (theirs, ours) in enumerate(zip(expected_batch, got_batch, strict=True)):
            where = f"batch {batch_index} frame {frame_index}"
            problem = _frame_problem(theirs.detections, ours.detections, tolerance_px, exact_counts)
            if problem is not None:
                problems.append(f"{where}: {problem}")
            detections += len(theirs.detections)
            outlines += sum(1 for polygon in ours.detections.polygons if polygon is not None and len(polygon))
    if detections == 0:
        problems.append("the reference found nothing: the check proves nothing")
    detail = f"{detections} detections, {outlines} outlines" + (f"; {len(problems)} problems: "
                                                                 + "; ".join(problems[:5]) if problems else "")
    return Check(name, not problems, detail)


def _frame_problem(theirs: Detections, ours: Detections, tolerance_px: float, exact_counts: bool) -> str | None:
    if exact_counts and len(theirs) != len(ours):
        return f"{len(ours)} detections, expected {len(theirs)}"
    if abs(len(theirs) - len(ours)) > 1:
        return f"{len(ours)} detections, expected {len(theirs)} (within one)"
    if len(ours.polygons) != len(ours):
        return f"{len(ours.polygons)} outlines for {len(ours)} detections"
    unmatched = [box for box in ours.boxes_xyxy
                 if not len(theirs) or np.abs(theirs.boxes_xyxy - box).max(axis=1).min() > tolerance_px]
    if len(unmatched) > (0 if exact_counts else 1):
        return f"{len(unmatched)} boxes further than {tolerance_px} px from every expected one"
    return None


def detector(device: str, graphs: bool, polygon_processes: int) -> UltralyticsDetector:
    config = ModelConfig(weights=str(SHIPPED_WEIGHTS), imgsz=640, runtime="torch", cuda_graphs=graphs,
                         polygon_processes=polygon_processes)
    model = UltralyticsDetector(config, device, max_batch=_BATCH)
    model.warmup([_BATCH])
    return model


def traced_in_workers(model: UltralyticsDetector, batches: Sequence[list[Frame]]) -> None:
    """Runs batches until the polygon workers (started by the first) take one, so the check measures them."""
    pool = model.polygon_pool
    deadline = time.monotonic() + 60
    if not model.device.startswith("cuda"):  # the CPU's masks never reach the workers
        return
    while pool is not None and pool.batches_in_workers == 0 and time.monotonic() < deadline:
        run_overlapped(model, batches[:1])
        time.sleep(0.2)


def in_its_own_process(device: str, batches: Sequence[list[Frame]], reference: Sequence[Sequence[FrameResult]],
                       on_device: bool) -> Check:
    """`model.inference_process`: frames from host memory through the shared inbox, or frames on the GPU (as
    NVDEC leaves them) through CUDA IPC handles."""
    import torch

    config = ModelConfig(weights=str(SHIPPED_WEIGHTS), imgsz=640, runtime="torch",
                         polygon_processes=2 if on_device else 0)
    model = ProcessDetector(config, device, max_batch=_BATCH)
    where = "the GPU (CUDA IPC), polygon_processes=2 in the child" if on_device else "the host"
    try:
        model.warmup([_BATCH])
        sent = [[replace(frame, image=torch.from_numpy(frame.image).to(device)) for frame in batch]
                for batch in batches] if on_device else batches
        got = run_overlapped(model, sent)
        workers = model.polygon_pool.pids if model.polygon_pool is not None else []
        peak_mb = model.device_peak_mb
    except Exception as error:
        return Check(f"model.inference_process, frames on {where}", False, f"failed: {error}")
    finally:
        model.close()
    return compare(f"model.inference_process, frames on {where}, two batches in flight (polygon workers the "
                   f"child reported: {len(workers)}; its GPU memory peak: {peak_mb} MB)", reference, got,
                   _BOX_TOLERANCE_PX, exact_counts=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    batches = scene_batches(args.batches)
    print(f"{len(batches)} batches of {_BATCH} frames of 1280x720 (one of them blank), bundled model at 640 px on "
          f"{args.device}", flush=True)
    reference_model = detector(args.device, graphs=False, polygon_processes=0)
    reference = [infer(reference_model, batch) for batch in batches]
    reference_model.close()
    checks: list[Check] = []
    for graphs, polygon_processes in ((False, 0), (True, 0), (True, 2)):
        name = f"cuda_graphs={graphs}, polygon_processes={polygon_processes}, two batches in flight"
        model = detector(args.device, graphs, polygon_processes)
        traced_in_workers(model, batches)
        pool = model.polygon_pool
        workers = [] if pool is None else pool.pids
        got = run_overlapped(model, batches)
        replaced = pool is not None and pool.pids != workers
        used = "" if pool is None else f" (batches traced by the workers: {pool.batches_in_workers})"
        model.close()
        check = compare(name + used, reference, got, _BOX_TOLERANCE_PX, exact_counts=True)
        if replaced:
            check = Check(check.name, False, check.detail + "; polygon workers were replaced during the run")
        checks.append(check)
        print(f"{'PASS' if checks[-1].passed else 'FAIL'} {checks[-1].name}: {checks[-1].detail}", flush=True)
    for on_device in (False, True) if args.device.startswith("cuda") else (False,):
        checks.append(in_its_own_process(args.device, batches, reference, on_device))
        print(f"{'PASS' if checks[-1].passed else 'FAIL'} {checks[-1].name}: {checks[-1].detail}", flush=True)
    if args.device != "cpu":
        cpu_model = detector("cpu", graphs=False, polygon_processes=0)
        cpu = [infer(cpu_model, batch) for batch in batches]
        checks.append(compare(f"{args.device} against the CPU (FP32), loosely", cpu, reference,
                              _CPU_BOX_TOLERANCE_PX, exact_counts=False))
        print(f"{'PASS' if checks[-1].passed else 'FAIL'} {checks[-1].name}: {checks[-1].detail}", flush=True)
    if args.json:
        args.json.write_text(json.dumps([check.__dict__ for check in checks], indent=2))
    passed = all(check.passed for check in checks)
    print("all checks passed" if passed else "SOME CHECKS FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
