"""`vap bench`: vap against the model's own limit and against Ultralytics' streaming, in one run.

Every contender sees the same generated clips, the same weights and the same input size:
  1. limit: batched forward + NMS on a pre-made device tensor (no decoding, no copies);
  2. Ultralytics alone, as users run it: `predict(source=<.streams file>, stream=True)`, and a plain
     loop calling `model(frame)` per decoded frame;
  3. vap end to end: files read as fast as possible, real broker, every message published; then the same
     with an instant model (the host ceiling: what decoding, batching, messages and Kafka can feed, so a
     gap between vap and the limit can be put on the host or on the device).
A fourth, paced run feeds vap at about 70% of its measured throughput to measure latency as cameras
see it (a run that reads files as fast as possible measures queueing, not latency).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from prometheus_client import CollectorRegistry

from pipeline.app import GIL_SWITCH_INTERVAL_S, Pipeline
from pipeline.children import replacements_by_role
from pipeline.config import ModelConfig, PipelineConfig, apply_override, parse_config
from pipeline.frames import Frame, FrameResult
from pipeline.inference.detector import Detector, PendingBatch, infer
from pipeline.inference.devices import resolve_device
from pipeline.inference.quantize import calibration_for
from pipeline.inference.runtimes import default_export_dir, resolve_model
from pipeline.ops.metrics import STAGES
from pipeline.tools.broker import EmbeddedBroker
from pipeline.tools.cpu_account import NATIVE, StolenTime, cpu_by_role, cpu_seconds
from pipeline.tools.demo import SHIPPED_WEIGHTS, UNTRAINED_FALLBACK


@dataclass(frozen=True)
class BenchOptions:
    streams: int = 4
    frames: int = 150
    width: int = 640
    height: int = 360
    imgsz: int = 320
    batch: int = 4
    max_wait_ms: float = 20.0
    device: str = "auto"
    runtime: str = "auto"
    precision: str = "auto"
    decoder: str = "cpu"
    codec: str = "auto"
    weights: str | None = None
    quick: bool = False
    soak_s: float = 0.0
    spool_log: bool = False
    decoding_processes: int = 0
    polygon_processes: int = 0
    message_processes: int = 0
    inference_process: bool = False
    tracking: bool = False
    sweep: tuple[int, ...] = ()
    sweep_fps: float = 30.0
    sweep_seconds: float = 20.0
    json_path: Path | None = None


@dataclass
class Measurement:
    name: str
    frames: int
    seconds: float
    peak_rss_mb: float
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    gpu_peak_mb: float | None = None
    notes: str = ""
    dropped: int | None = None  # vap runs: frames read but dropped; they are not in the latency percentiles
    batch_alone_ms: float | None = None  # limits: one batch with nothing else in flight (the p99 budget's unit)
    cpu_cores: float | None = None  # vap runs: CPU time of vap and its Kafka client process over the wall time
    cpu_ms_per_frame: dict[str, float] | None = None  # vap runs: the same CPU time by stage, per frame delivered
    cpu_stolen: float | None = None  # limits and vap runs: the machine's CPU time its hypervisor gave elsewhere
    streams: int | None = None  # sweep runs: cameras, each paced at the sweep's frame rate

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


@dataclass
class BenchReport:
    machine: dict[str, Any]
    options: dict[str, Any]
    measurements: list[Measurement] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)
    soak: dict[str, Any] | None = None


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def rss_mb(pid: int | None = None) -> float:
    try:
        with open(f"/proc/{pid or 'self'}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # a child that just exited
        pass
    return 0.0


def pipeline_cpu_seconds(pipeline: Pipeline) -> float:
    """This process and the pipeline's helper processes (`Pipeline.helper_pids`; not the bench's broker). A
    helper started or replaced during the run counts from its start."""
    return cpu_seconds() + sum(cpu_seconds(pid) for pids in pipeline.helper_pids.values() for pid in pids)


def pipeline_rss_mb(pipeline: Pipeline | None = None) -> float:
    """This process and, for a running pipeline, its Kafka client and decoder processes (not the bench's
    broker)."""
    if pipeline is None:
        return rss_mb()
    return rss_mb() + sum(rss_mb(pid) for pids in pipeline.helper_pids.values() for pid in pids)


@contextmanager
def peak_rss(pipeline: Pipeline | None = None) -> Iterator[Callable[[], float]]:
    """Samples RSS every 50 ms while the block runs; yields a getter for the peak."""
    peak = [pipeline_rss_mb(pipeline)]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], pipeline_rss_mb(pipeline))

    sampler = threading.Thread(target=sample, name="bench-rss", daemon=True)
    sampler.start()
    try:
        yield lambda: peak[0]
    finally:
        done.set()
        sampler.join()


def _percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


_UNIQUE_FRAMES = 60
_LOOP_FRAMES = 400
_ALONE_BATCHES = 10
_THROUGHPUT_CLIP_FPS = 30.0  # Ultralytics' stream loader sleeps a frame period whenever a buffer runs empty
CEILING_PASSES = 5  # an instant model gets through the clips in a blink; looping them times a longer run


CODECS = ("mpeg4", "h264", "h265")
_ENCODERS = {"h264": "libx264", "h265": "libx265"}


def codec_available(codec: str) -> bool:
    """H.264 and H.265 clips are written with PyAV's libx264 and libx265 (PyAV is a dependency of vap);
    OpenCV's wheels encode neither. Every OpenCV build writes MPEG-4."""
    if codec not in _ENCODERS:
        return codec == "mpeg4"
    try:
        import av
    except ImportError:
        return False
    return _ENCODERS[codec] in av.codecs_available


def default_codec(device: str) -> str:
    """What cameras send on a GPU box (its video engine decodes H.264 far faster than MPEG-4); MPEG-4 on the
    CPU, as every earlier CPU run used, so CPU results stay comparable."""
    return "h264" if device.startswith("cuda") and codec_available("h264") else "mpeg4"


def _write_bench_clip(path: Path, width: int, height: int, frames: int, fps: float, seed: int,
                      codec: str = "mpeg4") -> Path:
    """Renders at most `_UNIQUE_FRAMES` frames and repeats them: rendering is far slower than decoding,
    and a repeated frame costs the pipeline exactly what a new one does.

    MPEG-4 by default, which every OpenCV build writes, so results stay comparable across machines and runs.
    `h264` is what cameras send: it needs PyAV, and on a GPU's video engine it may decode faster than MPEG-4."""
    from pipeline.tools.synth.world import SceneSpec, render_scene

    unique = [image for image, _ in render_scene(
        SceneSpec(width=width, height=height, n_frames=min(frames, _UNIQUE_FRAMES), fps=fps, seed=seed))]
    if codec in _ENCODERS:
        _write_camera_codec(path, unique, frames, fps, _ENCODERS[codec])
        return path
    from pipeline.tools.synth.clips import open_writer

    writer, _ = open_writer(path, fps, (width, height), fourccs=("mp4v",))
    try:
        for index in range(frames):
            writer.write(unique[index % len(unique)])
    finally:
        writer.release()
    return path


def _write_camera_codec(path: Path, unique: list[np.ndarray], frames: int, fps: float, encoder: str) -> None:
    """As an IP camera encodes: no B-frames, a key frame every two seconds."""
    from fractions import Fraction

    import av

    height, width = unique[0].shape[:2]
    with av.open(str(path), "w") as container:
        options = {"preset": "veryfast", "bf": "0", "g": str(max(1, round(2 * fps)))}
        if encoder == "libx265":
            options["x265-params"] = f"bframes=0:keyint={options['g']}:log-level=error"
        stream = container.add_stream(encoder, rate=Fraction(fps).limit_denominator(1000), options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(unique[index % len(unique)], format="bgr24")))
        container.mux(stream.encode())


def add_clip_arguments(parser: argparse.ArgumentParser, frames: int) -> None:
    """The generated clips and the vap they run through, for the scripts in benchmarks/ (`clip_options`)."""
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--frames", type=int, default=frames, help="per clip")
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--decoder", default="cpu", help="cpu, or cuda[:N] for NVDEC")
    parser.add_argument("--codec", default="auto", choices=["auto", *CODECS],
                        help="of the generated clips (auto: h264 on a GPU, mpeg4 on the CPU, as `vap bench`)")
    parser.add_argument("--tracking", action="store_true",
                        help="every stream tracked, with a zone and a line (analytics.processes then applies)")


def clip_options(args: argparse.Namespace) -> tuple[BenchOptions, str]:
    """The options `add_clip_arguments` parsed, and the device they resolve to (which picks an `auto` codec)."""
    width, height = (int(value) for value in args.size.lower().split("x"))
    options = BenchOptions(streams=args.streams, frames=args.frames, width=width, height=height, imgsz=args.imgsz,
                           batch=args.batch, device=args.device, runtime=args.runtime, decoder=args.decoder,
                           codec=args.codec, tracking=args.tracking)
    device = resolve_device(options.device)
    if options.codec == "auto":
        options = replace(options, codec=default_codec(device))
    return options, device


def make_clips(directory: Path, options: BenchOptions, fps: float, prefix: str) -> list[Path]:
    """One clip per stream, each its own scene, rendered in parallel processes."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(directory / f"{prefix}-{index}.mp4", options.width, options.height, options.frames, fps, 7000 + index,
             options.codec)
            for index in range(options.streams)]
    with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        return list(pool.map(_write_bench_clip, *zip(*jobs, strict=True)))


def decode_all(paths: list[Path], limit: int) -> list[np.ndarray]:
    """Decoded frames of every clip, the first `limit` in all at most, taken evenly from each clip."""
    per_clip = max(1, limit // len(paths))
    frames = []
    for path in paths:
        capture = cv2.VideoCapture(str(path))
        count = 0
        while count < per_clip:
            ok, image = capture.read()
            if not ok:
                break
            frames.append(image)
            count += 1
        capture.release()
    return frames


def _cuda_peak_mb(device: str) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    return float(torch.cuda.max_memory_allocated(device)) / 2**20


def _pipeline_gpu_peak_mb(pipeline: Pipeline, device: str) -> float | None:
    """This process's peak, plus what each inference process (`model.inference_process`) said of its own: the
    model's memory is there, not here. The children's peaks include their warm-up."""
    peak = _cuda_peak_mb(device)
    children = [peak_mb for worker in pipeline.workers
                if (peak_mb := getattr(worker.detector, "device_peak_mb", None)) is not None]
    return None if peak is None else peak + sum(children)


def _reset_cuda_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def measure_limit(options: BenchOptions, weights: str, runtime: str, device: str, samples: list[np.ndarray],
                  seconds: float, label: str, precision: str = "auto",
                  calibration_urls: Sequence[str] = ()) -> Measurement:
    """Forward, NMS and mask assembly on one pre-made device tensor, repeated, with the fastest
    post-processing there is (vap's batched one; Ultralytics' own loops per image and is slower), and as
    many batches at once as the runtime runs in parallel."""
    from datetime import datetime, timezone

    from pipeline.config import ModelConfig
    from pipeline.inference.detector import UltralyticsDetector

    detector = UltralyticsDetector(ModelConfig(weights=weights, imgsz=options.imgsz, runtime=runtime,
                                               precision=precision), device, options.batch, calibration_urls)
    now = time.monotonic()
    frames = [Frame("limit", index, None, datetime.now(timezone.utc), now, samples[index % len(samples)])
              for index in range(options.batch)]
    tensor, prepared = detector.letterbox_batch(frames)

    def start() -> PendingBatch:
        return detector.forward(tensor, PendingBatch(frames=frames, started=time.perf_counter(), plan=prepared.plan))

    for _ in range(3):
        detector.collect(start())
    alone_ms = []
    for _ in range(_ALONE_BATCHES):
        pending = start()
        detector.complete(pending)
        alone_ms.append(1000 * (time.perf_counter() - pending.started))
    _reset_cuda_peak(device)
    done = 0
    batch_ms: list[float] = []
    running: deque[PendingBatch] = deque()
    with peak_rss() as peak:
        started, stolen = time.perf_counter(), StolenTime()
        while time.perf_counter() - started < seconds or done == 0:
            running.append(start())
            if len(running) >= detector.in_flight:
                finished = running.popleft()
                detector.complete(finished)
                batch_ms.append(1000 * (time.perf_counter() - finished.started))
                done += options.batch
        elapsed = time.perf_counter() - started
        for pending in running:
            detector.complete(pending)
        return Measurement(label, done, elapsed, peak(), latency_p50_ms=_percentile(batch_ms, 0.5),
                           latency_p99_ms=_percentile(batch_ms, 0.99), gpu_peak_mb=_cuda_peak_mb(device),
                           batch_alone_ms=statistics.median(alone_ms), cpu_stolen=stolen.fraction(),
                           notes=f"batch {options.batch}, {detector.in_flight} at once, latency is per batch "
                                 f"({statistics.median(alone_ms):.0f} ms alone); mask polygons on the host (and, on "
                                 "the CPU, each mask's upsampling inside its box, done with its polygon) not included")


def measure_ultralytics_streams(options: BenchOptions, weights: str, task: str, device: str, clips: list[Path],
                                workdir: Path, sample: np.ndarray) -> Measurement:
    """Warmed up on one frame first, as every other contender is: the predictor (model, export, warm-up) is made
    by the first call and reused by the next, so the timed run pays only for opening its streams."""
    from ultralytics import YOLO

    streams_file = workdir / "bench.streams"
    streams_file.write_text("\n".join(str(p) for p in clips) + "\n", encoding="utf-8")
    model = YOLO(weights, task=task)
    half = device.startswith("cuda")
    model.predict(sample, imgsz=options.imgsz, device=device, quantize=16 if half else None, verbose=False)
    _reset_cuda_peak(device)
    frames = 0
    with peak_rss() as peak:
        started = time.perf_counter()
        results = model.predict(source=str(streams_file), stream=True, stream_buffer=True, imgsz=options.imgsz,
                                device=device, quantize=16 if half else None, verbose=False)
        for _ in results:
            frames += 1
        elapsed = time.perf_counter() - started
        return Measurement("ultralytics predict(.streams, stream=True)", frames, elapsed, peak(),
                           gpu_peak_mb=_cuda_peak_mb(device),
                           notes="stream_buffer=True, so no frame is skipped; warmed up on one frame first")


def measure_ultralytics_loop(options: BenchOptions, weights: str, task: str, device: str,
                             frames: list[np.ndarray]) -> Measurement:
    from ultralytics import YOLO

    model = YOLO(weights, task=task)
    half = device.startswith("cuda")
    model.predict(frames[0], imgsz=options.imgsz, device=device, quantize=16 if half else None, verbose=False)
    _reset_cuda_peak(device)
    with peak_rss() as peak:
        started = time.perf_counter()
        for frame in frames:
            model(frame, imgsz=options.imgsz, device=device, quantize=16 if half else None, verbose=False)
        elapsed = time.perf_counter() - started
        return Measurement("ultralytics model(frame) loop", len(frames), elapsed, peak(),
                           gpu_peak_mb=_cuda_peak_mb(device),
                           notes=f"{len(frames)} frames decoded beforehand, decoding not timed")


class ReplayDetector:
    """An instant model for the host ceiling: each frame gets the detections the real model made on one of
    a few sample frames from the same clips, so messages are as large as real ones while the device does
    nothing. vap with it shows how many frames/s the host side alone can carry."""

    runtime = "none"

    def __init__(self, name: str, task: str, device: str, labels: dict[int, str],
                 samples: list[FrameResult]) -> None:
        self.name, self.task, self.device, self.labels = name, task, device, labels
        self._samples = samples

    @classmethod
    def sampled(cls, options: BenchOptions, weights: str, device: str, decoded: list[np.ndarray]) -> ReplayDetector:
        """The real model's detections on about one of `decoded` per stream, taken evenly."""
        from datetime import datetime, timezone

        from pipeline.config import ModelConfig
        from pipeline.inference.detector import UltralyticsDetector

        images = decoded[::max(1, len(decoded) // options.streams)]
        config = ModelConfig(weights=weights, imgsz=options.imgsz, runtime="torch", cuda_graphs=False)
        model = UltralyticsDetector(config, device, len(images))
        now = time.monotonic()
        samples = infer(model, [Frame("sample", index, None, datetime.now(timezone.utc), now, image)
                                for index, image in enumerate(images)])
        model.close()
        return cls(model.name, model.task, device, model.labels, samples)

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        pass

    def submit(self, frames: Sequence[Frame]) -> Sequence[Frame]:
        return frames

    def collect(self, pending: Sequence[Frame]) -> list[FrameResult]:
        now = time.monotonic()
        results = []
        for frame in pending:
            sample = self._samples[frame.frame_id % len(self._samples)]
            results.append(FrameResult(frame=frame, task=self.task, detections=sample.detections,
                                       labels=self.labels, classes=sample.classes, inferred_monotonic=now))
        return results

    def close(self) -> None:
        pass


_TRACKED = {"normalized": True, "zones": [{"id": "left", "polygon": [[0, 0], [0.5, 0], [0.5, 1], [0, 1]]}],
            "lines": [{"id": "middle", "start": [0.5, 0], "end": [0.5, 1]}]}
"""`--tracking`: each stream tracked, with a zone over the left half of the image and a line down its middle."""


def vap_config(options: BenchOptions, weights: str, clips: list[Path], bootstrap: str, topic: str,
               realtime: bool, device: str) -> PipelineConfig:
    """`device`: the one device every other contender runs on; `auto` would give vap every GPU of the host."""
    return parse_config({
        "streams": [{"id": f"bench-{i}", "url": str(path), "realtime": realtime, "decoder": options.decoder,
                     **({"analytics": _TRACKED} if options.tracking else {})} for i, path in enumerate(clips)],
        "model": {"weights": weights, "imgsz": options.imgsz, "device": device, "runtime": options.runtime,
                  "precision": options.precision, "polygon_processes": options.polygon_processes,
                  "inference_process": options.inference_process},
        "batching": {"max_batch": options.batch, "max_wait_ms": options.max_wait_ms},
        "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "spool": {"max_messages": 100_000}},
        "http": {"host": "127.0.0.1", "port": 0},
        "decoding": {"processes": options.decoding_processes},
        "analytics": {"message_processes": options.message_processes},
    })


def retargeted(config: PipelineConfig, topic: str, spool_dir: Path | None = None) -> PipelineConfig:
    """The same run publishing to another topic (each run reads its own messages back), optionally with the
    spool's log in `spool_dir`."""
    tree = config.model_dump()
    spool = {**tree["kafka"]["spool"], "dir": None if spool_dir is None else str(spool_dir)}
    tree["kafka"] = {**tree["kafka"], "topic": topic, "spool": spool}
    return parse_config(tree)


def looping(config: PipelineConfig) -> PipelineConfig:
    return parse_config({**config.model_dump(), "streams": [{**s.model_dump(), "loop": True} for s in config.streams]})


def delivered_messages(pipeline: Pipeline) -> int:
    """Messages the broker acknowledged, from the one counter: the registry's `get_sample_value` collects every
    metric of the pipeline, and polled every few milliseconds it took a fifth of the interpreter from the run it
    measures."""
    return int(next((sample.value for metric in pipeline.metrics.kafka_messages.collect()
                     for sample in metric.samples
                     if sample.name == "vap_kafka_messages_total" and sample.labels["result"] == "sent"), 0))


def with_overrides(config: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """The config with each `KEY.PATH=VALUE` applied, as `vap run --set` does."""
    tree = config.model_dump()
    for assignment in overrides:
        apply_override(tree, assignment)
    return parse_config(tree)


def run_vap(config: PipelineConfig, name: str, device: str, timeout_s: float,
            detector_factory: Callable[[PipelineConfig, str], Detector] | None = None,
            until_frames: int | None = None) -> Measurement:
    """Run until every file is done and every message is acknowledged by the broker (or, for looping clips, until
    `until_frames` messages are acknowledged): frames handed to the publisher but not yet delivered are not done.
    Latencies are read back from the published messages."""
    pipeline = Pipeline(config, detector_factory=detector_factory)

    def done() -> bool:
        if until_frames is not None:
            return delivered_messages(pipeline) >= until_frames
        return pipeline.sources_exhausted() and pipeline.publisher is not None and pipeline.publisher.backlog() == 0

    try:
        pipeline.start()
        _reset_cuda_peak(device)
        with peak_rss(pipeline) as peak, cpu_by_role(pipeline) as account:
            started, stolen = time.perf_counter(), StolenTime()
            cpu_at_start = pipeline_cpu_seconds(pipeline)
            deadline = time.monotonic() + timeout_s
            while not done() and time.monotonic() < deadline:
                time.sleep(0.005 if until_frames else 0.02)
            elapsed = time.perf_counter() - started
            cores = (pipeline_cpu_seconds(pipeline) - cpu_at_start) / elapsed if elapsed > 0 else None
            measured_frames = delivered_messages(pipeline)
            account.sample()
            stolen_fraction = stolen.fraction()
            per_frame = {role: 1000 * seconds / max(1, measured_frames)
                         for role, seconds in account.seconds_by_role().items()}
            dropped = _dropped_while_running(pipeline.registry)
            replaced = replacements_by_role(pipeline.helpers)
            pipeline.stop()
            peak_mb = peak()
    finally:
        pipeline.stop()  # a failed start leaves the Kafka client process and the HTTP server otherwise
    acknowledged = delivered_messages(pipeline)
    latencies = published_latencies(config.kafka.bootstrap_servers, config.kafka.topic, acknowledged)
    registry = pipeline.registry
    batches = registry.get_sample_value("vap_batch_size_count", {"device": device}) or 0.0
    frames_in_batches = registry.get_sample_value("vap_batch_size_sum", {"device": device}) or 0.0
    batch_seconds = registry.get_sample_value("vap_inference_seconds_sum", {"device": device}) or 0.0
    notes = (f"{len(latencies)} messages read back; mean batch {frames_in_batches / max(batches, 1):.1f} frames, "
             f"{1000 * batch_seconds / max(batches, 1):.1f} ms in the model; {dropped} frame(s) dropped; "
             f"per stage: {_stage_means(registry)}")
    if len(latencies) < acknowledged:
        notes += f"; {acknowledged - len(latencies)} acknowledged message(s) could not be read back"
    if replaced:  # a helper that died mid-run moved its work into vap's process for a while: numbers to distrust
        notes += "; helpers replaced during the run: " + ", ".join(f"{count} of the {role}" for role, count in
                                                                   replaced.items())
    return Measurement(name, measured_frames, elapsed, peak_mb,
                       latency_p50_ms=_percentile(latencies, 0.5), latency_p99_ms=_percentile(latencies, 0.99),
                       gpu_peak_mb=_pipeline_gpu_peak_mb(pipeline, device), notes=notes, dropped=dropped,
                       cpu_cores=cores, cpu_ms_per_frame=per_frame, cpu_stolen=stolen_fraction)


def _stage_means(registry: CollectorRegistry) -> str:
    """Mean milliseconds per observation of each stage (`vap_stage_seconds`), where the time went."""
    means = []
    for stage in STAGES:
        count = registry.get_sample_value("vap_stage_seconds_count", {"stage": stage}) or 0.0
        if count:
            total = registry.get_sample_value("vap_stage_seconds_sum", {"stage": stage}) or 0.0
            means.append(f"{stage} {1000 * total / count:.1f} ms")
    return ", ".join(means) or "none"


def _dropped_while_running(registry: CollectorRegistry) -> int:
    """Frames a stop leaves behind (reason `shutdown`) are not the run's losses: a looping run stops on purpose
    with frames still queued."""
    return int(sum(sample.value for metric in registry.collect() if metric.name == "vap_frames_dropped"
                   for sample in metric.samples
                   if sample.name == "vap_frames_dropped_total" and sample.labels.get("reason") != "shutdown"))


def published_latencies(bootstrap: str, topic: str, expected: int) -> list[float]:
    """Capture to the Kafka client's send, per message: the record's timestamp is stamped by the producer when
    the message is sent, so it includes the wait in the publisher's queue and the hand-over to the client
    process, which the message's own `latency_ms.total` (taken when it is built) leaves out."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False)
    latencies: list[float] = []
    deadline = time.monotonic() + 30
    try:
        while len(latencies) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                for record in records:
                    captured = datetime.fromisoformat(json.loads(record.value)["captured_at"])
                    latencies.append(max(0.0, record.timestamp - 1000 * captured.timestamp()))
    finally:
        consumer.close()
    return latencies


def machine_facts(device: str) -> dict[str, Any]:
    import os
    import platform

    import torch

    facts: dict[str, Any] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                             "python": platform.python_version(), "torch": torch.__version__, "device": device}
    if device.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name(device)
    else:
        facts["cpu"] = platform.processor() or platform.machine()
    return facts


def run_bench(options: BenchOptions) -> BenchReport:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # what the pipeline runs with, for every contender alike
    if options.quick:
        options = BenchOptions(**{**asdict(options), "frames": min(options.frames, 60), "quick": True})
    weights = options.weights or (str(SHIPPED_WEIGHTS) if SHIPPED_WEIGHTS.is_file() else UNTRAINED_FALLBACK)
    device = resolve_device(options.device)
    if options.codec == "auto":
        options = replace(options, codec=default_codec(device))
    report = BenchReport(machine_facts(device), {**asdict(options), "weights": weights,
                                                  "json_path": str(options.json_path or "")})
    with tempfile.TemporaryDirectory(prefix="vap-bench-") as tmp, EmbeddedBroker() as broker:
        workdir = Path(tmp)
        progress(f"generating {options.streams} clips of {options.frames} frames ({options.width}x{options.height})")
        clips = make_clips(workdir, options, fps=_THROUGHPUT_CLIP_FPS, prefix="fast")
        frames = decode_all(clips, limit=_LOOP_FRAMES)
        seconds = 5.0 if options.quick else 15.0
        from ultralytics import YOLO

        task = str(YOLO(weights).task)
        model = ModelConfig(weights=weights, imgsz=options.imgsz, runtime=options.runtime, precision=options.precision)
        precision = model.effective_precision(device)
        int8 = calibration_for(model, [str(clip) for clip in clips]) if precision == "int8" else None
        resolved = resolve_model(weights, options.runtime, device, options.imgsz, options.batch,
                                 precision == "fp16", default_export_dir(), int8)
        report.options["runtime"] = resolved.runtime
        report.options["precision"] = precision
        extra = _reference_limits(options, weights, resolved.runtime, precision, device, frames, seconds)
        progress("2/5 ultralytics predict on a .streams source")
        streams = measure_ultralytics_streams(options, resolved.path, task, device, clips, workdir, frames[0])
        progress("2/5 ultralytics model(frame) loop")
        loop = measure_ultralytics_loop(options, resolved.path, task, device, frames)

        def limit_part(when: str) -> Measurement:
            progress(f"3/5 model-bound limit on {resolved.runtime} {precision}, {when} ({seconds / 2:.1f} s)")
            return measure_limit(options, weights, resolved.runtime, device, frames, seconds / 2,
                                 f"limit ({resolved.runtime} {precision}, forward+NMS)", options.precision,
                                 [str(clip) for clip in clips])

        limit_before = limit_part("before vap's end-to-end run")
        progress("3/5 vap end to end, files as fast as possible, publishing to the broker")
        throughput = vap_config(options, weights, clips, broker.bootstrap_servers, "bench.throughput", False, device)
        vap = run_vap(throughput, "vap end to end (throughput)", device, timeout_s=600)
        limit = bracketing(limit_before, limit_part("after it"))
        progress("4/5 vap with an instant model (the host ceiling), same clips and broker")
        replay = ReplayDetector.sampled(options, weights, device, frames)
        ceiling_config = looping(vap_config(options, weights, clips, broker.bootstrap_servers, "bench.ceiling",
                                            False, device))
        instant: dict[str, Any] = {"detector_factory": lambda _config, _device: replay,
                                   "until_frames": CEILING_PASSES * options.streams * options.frames}
        ceiling = run_vap(ceiling_config, "vap host ceiling (instant model)", device, timeout_s=600, **instant)
        spool_log = measure_spool_log_cost(options, report, workdir, device, [
            (vap, throughput, {}), (ceiling, ceiling_config, instant)]) if options.spool_log else []
        paced_fps = max(1.0, round(0.7 * vap.fps / options.streams, 1))  # MPEG-4 refuses some finer rates
        progress(f"5/5 vap paced at {paced_fps:.1f} frames/s per stream ({0.7:.0%} of its throughput) for latency")
        paced_clips = make_clips(workdir, options, fps=paced_fps, prefix="paced")
        paced_config = vap_config(options, weights, paced_clips, broker.bootstrap_servers, "bench.paced", True, device)
        paced = run_vap(paced_config, "vap end to end (paced, latency)", device, timeout_s=600)
        report.measurements = [limit, *extra, streams, loop, vap, ceiling, *spool_log, paced]
        best_ultralytics = max(streams.fps, loop.fps)
        report.ratios = report.ratios | {
            "vap_over_limit": vap.fps / limit.fps if limit.fps else 0.0,
            "vap_over_best_ultralytics": vap.fps / best_ultralytics if best_ultralytics else 0.0,
            "batch_inference_ms": limit.batch_alone_ms or 0.0,
            "host_ceiling_over_limit": ceiling.fps / limit.fps if limit.fps else 0.0,
        }
        report.ratios["p99_budget_ms"] = 2 * report.ratios["batch_inference_ms"] + options.max_wait_ms
        if precision == "int8" and extra[0].fps:
            report.ratios["int8_limit_over_fp32_limit"] = limit.fps / extra[0].fps
        if vap.cpu_ms_per_frame:
            report.ratios["vap_model_runtime_cpu_share"] = model_runtime_share(vap.cpu_ms_per_frame)
        if options.soak_s > 0:
            report.soak = soak(options, weights, device, workdir, broker.bootstrap_servers, paced_fps)
        if options.sweep:
            report.measurements += measure_sweep(options, weights, device, workdir, broker.bootstrap_servers)
    return report


def bracketing(before: Measurement, after: Measurement) -> Measurement:
    """The limit measured in two halves, just before and just after the run it is compared with, as one: on a
    shared machine whose speed drifts between minutes, a limit taken a minute earlier put single-run ratios
    anywhere from 0.5 to 1.0 of their median. The notes give both halves, and so the drift."""
    stolen = [part.cpu_stolen for part in (before, after) if part.cpu_stolen is not None]
    return replace(before, frames=before.frames + after.frames, seconds=before.seconds + after.seconds,
                   peak_rss_mb=max(before.peak_rss_mb, after.peak_rss_mb),
                   cpu_stolen=sum(stolen) / len(stolen) if stolen else None,
                   notes=f"{before.notes}; {before.fps:.1f} frames/s just before vap's end-to-end run and "
                         f"{after.fps:.1f} just after it ({after.fps / before.fps - 1:+.0%})"
                   if before.fps else before.notes)


def _reference_limits(options: BenchOptions, weights: str, runtime: str, precision: str, device: str,
                      frames: list[np.ndarray], seconds: float) -> list[Measurement]:
    """The limit again for the ratio that explains it: FP32 beside INT8, or PyTorch beside another runtime."""
    if precision == "int8":
        progress(f"1/5 model-bound limit on {runtime} fp32, for INT8's speed-up ({seconds:.0f} s)")
        return [measure_limit(options, weights, runtime, device, frames, seconds,
                              f"limit ({runtime} fp32, forward+NMS)", "fp32")]
    if runtime != "torch":
        progress(f"1/5 model-bound limit on torch, for the runtime's speed-up ({seconds:.0f} s)")
        return [measure_limit(options, weights, "torch", device, frames, seconds, "limit (torch, forward+NMS)")]
    return []


def measure_sweep(options: BenchOptions, weights: str, device: str, workdir: Path, bootstrap: str,
                  detector_factory: Callable[[PipelineConfig, str], Detector] | None = None) -> list[Measurement]:
    """How cost grows with cameras: for each count, that many streams paced at `sweep_fps` (looping clips
    read in real time, as cameras send), until `sweep_seconds` worth of frames are delivered. A camera count
    vap cannot carry shows as delivered frames/s below the offered rate, dropped frames and a long p99."""
    clips = make_clips(workdir, options, fps=options.sweep_fps, prefix="sweep")
    measured = []
    for count in options.sweep:
        progress(f"sweep: {count} cameras at {options.sweep_fps:g} frames/s for {options.sweep_seconds:.0f} s")
        config = looping(vap_config(options, weights, [clips[index % len(clips)] for index in range(count)],
                                    bootstrap, f"bench.sweep.{count}", True, device))
        run = run_vap(config, f"sweep: {count} cameras at {options.sweep_fps:g} fps", device,
                      timeout_s=3 * options.sweep_seconds + 60, detector_factory=detector_factory,
                      until_frames=round(count * options.sweep_fps * options.sweep_seconds))
        run.streams = count
        measured.append(run)
    return measured


def measure_spool_log_cost(options: BenchOptions, report: BenchReport, workdir: Path, device: str,
                           runs: list[tuple[Measurement, PipelineConfig, dict[str, Any]]]) -> list[Measurement]:
    """Each vap run again with the spool's write-ahead log (`kafka.spool.dir`), in ABBA order after the first
    run (A, measured already), so that a machine's drift between runs hits both alike; the ratio is the mean
    with the log over the mean without."""
    measured: list[Measurement] = []
    for first, config, extra in runs:
        progress(f"spool log: {first.name} with kafka.spool.dir, twice, then once more without")
        logged = [run_vap(retargeted(config, f"{config.kafka.topic}.log{index}",
                                     workdir / f"spool-{len(measured)}-{index}"),
                          f"{first.name} + spool log", device, timeout_s=600, **extra) for index in range(2)]
        again = run_vap(retargeted(config, f"{config.kafka.topic}.again"), f"{first.name} (again)", device,
                        timeout_s=600, **extra)
        without = statistics.mean([first.fps, again.fps])
        key = "spool_log_over_memory_" + ("host_ceiling" if "ceiling" in first.name else "end_to_end")
        report.ratios[key] = statistics.mean(m.fps for m in logged) / without if without else 0.0
        measured += [*logged, again]
    return measured


def soak(options: BenchOptions, weights: str, device: str, workdir: Path, bootstrap: str,
         paced_fps: float) -> dict[str, Any]:
    """A long paced run on looping clips; RSS is sampled every 10 s to show it stays flat."""
    progress(f"soak: {options.soak_s:.0f} s paced run, RSS sampled every 10 s")
    clips = make_clips(workdir, options, fps=paced_fps, prefix="soak")
    config = looping(vap_config(options, weights, clips, bootstrap, "bench.soak", True, device))
    samples: list[float] = []
    pipeline = Pipeline(config)
    try:
        pipeline.start()
        started = time.monotonic()
        while time.monotonic() - started < options.soak_s:
            time.sleep(10.0)
            samples.append(pipeline_rss_mb(pipeline))
            progress(f"soak {time.monotonic() - started:.0f} s: RSS {samples[-1]:.0f} MB")
    finally:
        pipeline.stop()
    warm = samples[len(samples) // 10:] or samples
    first, last = statistics.mean(warm[: max(1, len(warm) // 5)]), statistics.mean(warm[-max(1, len(warm) // 5):])
    return {"seconds": options.soak_s, "rss_mb_samples": samples, "rss_growth_ratio": last / first if first else 0.0}


def format_report(report: BenchReport) -> str:
    lines = [
        f"machine: {report.machine}",
        f"runtime: {report.options.get('runtime')} {report.options.get('precision', '')}, "
        f"batch {report.options.get('batch')}, "
        f"imgsz {report.options.get('imgsz')}, {report.options.get('streams')} streams",
        f"{'contender':<44} {'frames':>7} {'fps':>8} {'p50 ms':>8} {'p99 ms':>8} {'peak RSS MB':>12} {'GPU MB':>8} "
        f"{'CPU cores':>9}",
    ]
    for m in report.measurements:
        if m.streams is not None:
            continue
        lines.append(
            f"{m.name:<44} {m.frames:>7} {m.fps:>8.1f} {_fmt(m.latency_p50_ms):>8} {_fmt(m.latency_p99_ms):>8} "
            f"{m.peak_rss_mb:>12.0f} {_fmt(m.gpu_peak_mb):>8} {_fmt1(m.cpu_cores):>9}"
        )
    ratios = report.ratios
    lines.append(f"vap / limit: {ratios['vap_over_limit']:.2f}x   "
                 f"vap / best Ultralytics: {ratios['vap_over_best_ultralytics']:.2f}x   "
                 f"p99 budget (2 x one batch's inference alone + max_wait): {ratios['p99_budget_ms']:.0f} ms")
    if "host_ceiling_over_limit" in ratios:
        side = "the host side" if ratios["host_ceiling_over_limit"] < 1 else "the model"
        lines.append(f"host ceiling / limit: {ratios['host_ceiling_over_limit']:.2f}x (vap is bounded by {side})")
    sweep = [m for m in report.measurements if m.streams is not None]
    if sweep:
        lines.append(f"{'cameras':>7} {'offered fps':>11} {'delivered':>9} {'dropped':>7} {'p99 ms':>7} "
                     f"{'CPU cores':>9} {'GPU MB':>7} {'GPU MB/camera':>13}")
        for m in sweep:
            offered = (m.streams or 0) * float(report.options.get("sweep_fps") or 0)
            per_camera = None if m.gpu_peak_mb is None else m.gpu_peak_mb / max(1, m.streams or 1)
            lines.append(f"{m.streams:>7} {offered:>11.0f} {m.fps:>9.1f} {m.dropped or 0:>7} "
                         f"{_fmt(m.latency_p99_ms):>7} {_fmt1(m.cpu_cores):>9} {_fmt(m.gpu_peak_mb):>7} "
                         f"{_fmt1(per_camera):>13}")
    lines.extend(f"  {m.name}: {m.notes}" for m in report.measurements if m.notes)
    lines.extend(f"  {m.name}, CPU ms per frame by stage: {_cpu_by_stage(m.cpu_ms_per_frame)}"
                 for m in report.measurements if m.cpu_ms_per_frame)
    stolen = [f"{m.name} {m.cpu_stolen:.0%}" for m in report.measurements if m.cpu_stolen is not None]
    if any(m.cpu_stolen and m.cpu_stolen >= 0.01 for m in report.measurements):
        lines.append(f"CPU time this machine's hypervisor gave to other guests (such runs are slowed by it): "
                     f"{', '.join(stolen)}")
    for key, value in ratios.items():
        if key.startswith("spool_log_over_memory_"):
            lines.append(f"{key.removeprefix('spool_log_over_memory_').replace('_', ' ')} with the spool log / "
                         f"without: {value:.3f}x (ABBA)")
    if report.soak is not None:
        lines.append(f"soak {report.soak['seconds']:.0f} s: RSS growth {report.soak['rss_growth_ratio']:.3f}x")
    return "\n".join(lines)


def model_runtime_share(per_frame: dict[str, float]) -> float:
    """The model runtime's share of a vap run's CPU. Unlike frames/s, it holds still while a shared machine's
    speed drifts, and where the model fills every core it bounds vap / limit (the limit spends nearly all
    of its CPU in the model)."""
    total = sum(per_frame.values())
    return per_frame.get(NATIVE, 0.0) / total if total > 0 else 0.0


def _cpu_by_stage(per_frame: dict[str, float]) -> str:
    return ", ".join([f"{role} {ms:.2f}" for role, ms in per_frame.items() if ms >= 0.005]
                     + [f"in all {sum(per_frame.values()):.2f} (the model runtime's share "
                        f"{model_runtime_share(per_frame):.2f})"])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _fmt1(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def report_json(report: BenchReport) -> str:
    measurements = [{**asdict(m), "fps": m.fps} for m in report.measurements]
    return json.dumps({**asdict(report), "measurements": measurements}, indent=2)
