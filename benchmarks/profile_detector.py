"""Where one batch's time goes inside the detector, with the host idle and with it busy decoding.

    python benchmarks/profile_detector.py --device cuda:0 --batch 32 --size 1920x1080 --imgsz 640

Prints milliseconds per batch for each step (upload and letterbox, forward, NMS and masks, polygons)
and for the whole `infer`, first on an idle host, then while `--decoders` threads decode a 1080p clip
as fast as they can, as the stream readers of a busy camera site do (with the decoder threads the
pipeline gives each stream). The gap between the two shows how much of a step is host contention
rather than device work.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import torch

from pipeline.config import ModelConfig
from pipeline.frames import Frame
from pipeline.inference.detector import UltralyticsDetector, infer
from pipeline.sources.opencv import decoder_threads
from pipeline.tools.demo import SHIPPED_WEIGHTS
from pipeline.tools.synth.world import SceneSpec, render_scene


def synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def profile(detector: UltralyticsDetector, frames: list[Frame], device: str, repeats: int) -> dict[str, float]:
    spent: dict[str, float] = {}

    def timed(step: str, work: Callable[[], Any]) -> Any:
        synchronise(device)
        started = time.perf_counter()
        result = work()
        synchronise(device)
        spent[step] = spent.get(step, 0.0) + time.perf_counter() - started
        return result

    for _ in range(repeats):
        batch, pending = timed("upload + letterbox", lambda: detector.letterbox_batch(frames))
        timed("forward + NMS + masks", lambda: detector.complete(detector.forward(batch, pending)))  # noqa: B023
        timed("polygons (host)", lambda: detector.collect(pending))  # noqa: B023
        timed("whole infer()", lambda: infer(detector, frames))
    return {step: 1000 * seconds / repeats for step, seconds in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", default="1920x1080")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--decoders", type=int, default=16, help="threads decoding while the second pass runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--weights", default=str(SHIPPED_WEIGHTS))
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    images = [image for image, _ in render_scene(SceneSpec(width=width, height=height, n_frames=4, seed=3))]
    now = time.monotonic()
    frames = [Frame("profile", index, None, datetime.now(timezone.utc), now, images[index % len(images)].copy())
              for index in range(args.batch)]
    detector = UltralyticsDetector(ModelConfig(weights=args.weights, imgsz=args.imgsz, runtime="torch"),
                                   args.device, args.batch)
    detector.warmup([args.batch])
    print(f"{args.batch} frames of {width}x{height} at imgsz {args.imgsz} on {args.device}, ms per batch")
    for step, ms in profile(detector, frames, args.device, args.repeats).items():
        print(f"  idle host   {step:24s} {ms:8.1f}")

    with tempfile.TemporaryDirectory() as scratch:
        clip = Path(scratch) / "decode.mp4"
        writer = cv2.VideoWriter(str(clip), cv2.VideoWriter.fourcc(*"mp4v"), 10, (width, height))
        for index in range(40):
            writer.write(images[index % len(images)])
        writer.release()
        stop = threading.Event()
        decoded = [0]

        def decode() -> None:
            while not stop.is_set():
                capture = cv2.VideoCapture(str(clip), cv2.CAP_FFMPEG,
                                           [cv2.CAP_PROP_N_THREADS, decoder_threads(args.decoders)])
                while not stop.is_set() and capture.read()[0]:
                    decoded[0] += 1
                capture.release()

        threads = [threading.Thread(target=decode, name=f"decode-{i}", daemon=True) for i in range(args.decoders)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        before, started = decoded[0], time.perf_counter()
        busy = profile(detector, frames, args.device, args.repeats)
        rate = (decoded[0] - before) / (time.perf_counter() - started)
        stop.set()
        for thread in threads:
            thread.join()
    for step, ms in busy.items():
        print(f"  {args.decoders} decoding {step:24s} {ms:8.1f}")
    print(f"  decoders ran at {rate:.0f} frames/s meanwhile")


if __name__ == "__main__":
    main()
