"""What tracing a GPU batch's mask outlines costs the pipeline's process, in-process and through polygon workers
(`model.polygon_processes`).

The bench's scenes go through the bundled model at 640 px as on a GPU: whole masks, of which only each mask's
window around its box is handed over (`pack_mask_windows`), here on the CPU. The finisher's CPU time per batch is
what the inference thread waits for on a GPU host, because the finisher holds the interpreter while it traces.
Busier scenes are simulated by repeating each frame's detections.

    .venv/bin/python benchmarks/polygon_workers.py [--workers 1,2] [--repeats 1,3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline.inference.polygon_pool import PolygonPool
from pipeline.inference.postprocess import (
    BatchDetections,
    assemble,
    batched_nms,
    frame_detections,
    pack_mask_windows,
    window_bounds,
)
from pipeline.inference.preprocess import HostLetterbox, Letterbox, plan_batch
from pipeline.tools.bench import BenchOptions, decode_all, make_clips
from pipeline.tools.demo import SHIPPED_WEIGHTS

_BATCH = 16
_IMGSZ = 640


def gpu_like_batch() -> tuple[BatchDetections, list[Letterbox]]:
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory() as directory:
        clips = make_clips(Path(directory), BenchOptions(streams=4, frames=20, codec="mpeg4"), fps=30, prefix="p")
        images = decode_all(clips, limit=_BATCH)
    model = YOLO(str(SHIPPED_WEIGHTS)).model.eval()
    plan = plan_batch(images, _IMGSZ, 32, True)
    with torch.inference_mode():
        predictions = model(HostLetterbox()(images, plan, torch.float32))
        protos = predictions[0][1] if isinstance(predictions[0], tuple) else predictions[1]  # as the detector does
        predictions = predictions[0]
        if isinstance(predictions, (list, tuple)):
            predictions = predictions[0]
        rows, image_index = batched_nms(predictions, len(model.names), 0.25, 0.45, None, False, plan[0].input_hw)
        found = assemble(rows, image_index, plan, protos, full_masks=True)
    return pack_mask_windows(found, plan), plan


def repeated(found: BatchDetections, times: int) -> BatchDetections:
    """Each detection `times` over, in its own frame: a scene `times` as busy, traced the same way."""
    assert found.mask_windows is not None and found.mask_pixels is not None
    order = np.repeat(np.arange(len(found.image_index)), times)
    starts = window_bounds(found.mask_windows.numpy())
    pixels = found.mask_pixels.numpy()
    return BatchDetections(found.rows[order], found.image_index[order], None, mask_windows=found.mask_windows[order],
                           mask_pixels=torch.from_numpy(np.concatenate([pixels[starts[i]:starts[i + 1]]
                                                                        for i in order])))


def per_batch_ms(trace: Callable[[BatchDetections, list[Letterbox]], object], found: BatchDetections,
                 plan: list[Letterbox], batches: int = 100) -> tuple[float, float]:
    """(CPU ms of the calling thread, wall ms) per batch."""
    cpu, wall = time.thread_time(), time.perf_counter()
    for _ in range(batches):
        trace(found, plan)
    return (time.thread_time() - cpu) * 1000 / batches, (time.perf_counter() - wall) * 1000 / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="pool sizes to try, comma separated")
    parser.add_argument("--repeats", default="1,3", help="scene densities to try (detections repeated)")
    parser.add_argument("--rounds", type=int, default=2, help="in-process and pool measured in turn this often")
    args = parser.parse_args()
    print(f"rendering the bench's scenes and running the bundled model on {_BATCH} frames at {_IMGSZ} px", flush=True)
    found, plan = gpu_like_batch()
    for workers in (int(count) for count in args.workers.split(",")):
        pool = PolygonPool(workers)
        while pool.ready_workers < workers:  # the first calls start the workers and are traced here
            pool.frame_detections(found, plan)
            time.sleep(0.1)
        for times in (int(count) for count in args.repeats.split(",")):
            busy = repeated(found, times)
            for _ in range(10):
                pool.frame_detections(busy, plan)
            for round_ in range(args.rounds):
                here_cpu, here_wall = per_batch_ms(frame_detections, busy, plan)
                pool_cpu, pool_wall = per_batch_ms(pool.frame_detections, busy, plan)
                print(f"{len(busy.rows)} detections in {_BATCH} frames, {workers} worker(s), round {round_ + 1}: "
                      f"in-process {here_cpu:.2f} ms CPU ({here_wall:.2f} wall), through the workers "
                      f"{pool_cpu:.2f} ms CPU of the caller ({pool_wall:.2f} wall): {here_cpu / pool_cpu:.1f}x less",
                      flush=True)
        pool.close()


if __name__ == "__main__":
    main()
