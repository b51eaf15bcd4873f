"""What building messages costs the pipeline's process per frame, with and without message workers.

    python benchmarks/message_path.py --frames 20000 --batch 32 --processes 2

One thread hands batches of results to the analytics stage as a finisher does (`AnalyticsStage.submit_batch`),
for 16 streams without analytics; a sink stands in for the publisher and settles each frame. Each round runs
the stage as configured by default (messages built by its threads) and then with `--processes` message workers
(`analytics.message_processes`), on the same results: 2-5 detections a frame with outlines of 20-60 points, as
the bench's replayed scenes have, or none with `--empty`. It prints, per frame, the CPU of this process (every
thread: what needs the interpreter's lock a GPU's inference thread needs too), the CPU of the message workers,
and the wall time of the hand-over.

With `--tracking` the streams have analytics instead (tracking, a zone over the left half of the image and a
line down its middle; 2-5 objects a frame moving across it): those results take the lanes, and the second run
of a round has `--processes` analytics workers (`analytics.processes`) instead, which run each stream's
tracking, zones and lines while the lanes' threads wait.
"""

from __future__ import annotations

import argparse
import threading
import time
from datetime import datetime, timezone

import numpy as np
from prometheus_client import CollectorRegistry

from pipeline.analytics.stage import AnalyticsStage, StreamAnalysis
from pipeline.config import AnalyticsConfig, AnalyticsStageConfig, SnapshotConfig
from pipeline.frames import Detections, Frame, FrameResult
from pipeline.ledger import FrameLedger
from pipeline.ops.health import Heartbeats
from pipeline.ops.metrics import PipelineMetrics
from pipeline.publishing.building import MessageBuilder
from pipeline.publishing.spool import OutgoingMessage
from pipeline.tools.cpu_account import cpu_seconds

_STREAMS = 16
_LABELS = {index: f"class-{index}" for index in range(80)}
_IMAGE = np.zeros((1080, 1920, 3), np.uint8)  # shared by every frame: only its size is read


def detections(generator: np.random.Generator, empty: bool) -> Detections:
    if empty:
        return Detections.empty()
    count = int(generator.integers(2, 6))
    corners = generator.uniform(0, 1500, (count, 2))
    boxes = np.concatenate([corners, corners + generator.uniform(20, 300, (count, 2))], 1).astype(np.float32)
    polygons = tuple(generator.uniform(0, 1080, (int(generator.integers(20, 61)), 2)).astype(np.float32)
                     for _ in range(count))
    return Detections(boxes, generator.uniform(0.25, 1, count).astype(np.float32),
                      generator.integers(0, 80, count).astype(np.int64), polygons)


def moving(frame_id: int, stream: int) -> Detections:
    """Objects that cross the image from left to right, 8 px a frame, as a tracker expects them."""
    count = 2 + stream % 4
    left = (np.arange(count) * 1920 / count + frame_id * 8 + stream * 37) % 1800
    top = 200 + np.arange(count) * 150.0
    boxes = np.stack([left, top, left + 90, top + 200], 1).astype(np.float32)
    return Detections(boxes, np.full(count, 0.8, np.float32), np.zeros(count, np.int64))


def workers_seconds(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def stream_analytics(stage: AnalyticsStage, stream_id: str) -> StreamAnalysis:
    config = AnalyticsConfig.model_validate({
        "tracking": True, "zones": [{"id": "left", "polygon": [[0, 0], [960, 0], [960, 1080], [0, 1080]]}],
        "lines": [{"id": "middle", "start": [960, 0], "end": [960, 1080]}]})
    return stage.new_analysis(stream_id, config, "bytetrack", _LABELS)


def one_run(processes: int, frames: int, batch: int, empty: bool, tracking: bool = False) -> dict[str, float]:
    metrics = PipelineMetrics(CollectorRegistry())
    ledger = FrameLedger(metrics)
    heartbeats = Heartbeats(metrics)

    def settle(messages: list[OutgoingMessage]) -> None:
        for message in messages:
            if message.ticket is not None:
                ledger.published(message.ticket)

    config = AnalyticsStageConfig(processes=processes) if tracking else \
        AnalyticsStageConfig(message_processes=processes)
    stage = AnalyticsStage(config, MessageBuilder("bench", SnapshotConfig()), settle, ledger, metrics, heartbeats)
    stage.start()
    runs = [ledger.add_stream(f"cam-{index}") for index in range(_STREAMS)]
    for index, run in enumerate(runs):
        stage.add_stream(f"cam-{index}", run, stream_analytics(stage, f"cam-{index}") if tracking else None,
                         wait_when_full=True)
    generator = np.random.default_rng(7)
    results = []
    for frame_id in range(frames):
        index = frame_id % _STREAMS
        frame = Frame(f"cam-{index}", frame_id // _STREAMS, frame_id * 33.3, datetime.now(timezone.utc),
                      time.monotonic(), _IMAGE, runs[index])
        ledger.read(frame.ticket)
        found = moving(frame.frame_id, index) if tracking else detections(generator, empty)
        results.append(FrameResult(frame, "segment", found, _LABELS, inference_ms=12.5))
    stop = threading.Event()
    pids = (stage.messages.pids if stage.messages is not None else []) + \
        (stage.processes.pids if stage.processes is not None else [])
    cpu, workers_cpu, wall = time.process_time(), workers_seconds(pids), time.monotonic()
    for first in range(0, frames, batch):
        stage.submit_batch(results[first:first + batch], stop)
    while ledger.published_total < frames:
        time.sleep(0.001)
    cpu, workers_cpu, wall = (time.process_time() - cpu, workers_seconds(pids) - workers_cpu,
                              time.monotonic() - wall)
    in_workers = (stage.messages.frames_in_workers if stage.messages is not None else 0) + \
        (stage.processes.frames_in_workers if stage.processes is not None else 0)
    stage.stop_within(time.monotonic() + 2)
    return {"process_us": cpu / frames * 1e6, "workers_us": workers_cpu / frames * 1e6,
            "wall_us": wall / frames * 1e6, "in_workers": in_workers / frames}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--processes", type=int, default=2,
                        help="message workers (analytics workers with --tracking) of the second run of a round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--empty", action="store_true", help="frames without detections")
    parser.add_argument("--tracking", action="store_true", help="streams with tracking, a zone and a line")
    args = parser.parse_args()
    found = ("2-5 tracked objects" if args.tracking else "no detections" if args.empty
             else "2-5 detections with outlines")
    print(f"{args.frames} frames of {_STREAMS} streams, batches of {args.batch}, {found} a frame; us per frame:")
    for round_index in range(args.rounds):
        for processes in (0, args.processes):
            numbers = one_run(processes, args.frames, args.batch, args.empty, args.tracking)
            key = "processes" if args.tracking else "message_processes"
            print(f"round {round_index + 1} {key}={processes}: this process {numbers['process_us']:6.1f}"
                  f"  workers {numbers['workers_us']:6.1f}  wall {numbers['wall_us']:6.1f}"
                  f"  {'analysed' if args.tracking else 'built'} in workers {numbers['in_workers']:.0%}", flush=True)


if __name__ == "__main__":
    main()
