"""`vap demo`: the whole pipeline with zero set-up.

It generates sample clips from the synthetic shapes world (cached after the first run), starts an
embedded Kafka-compatible broker, runs the bundled model on several streams at once, prints a live
per-stream summary, and at the end reads the topic back to show what was published.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from types import FrameType

from prometheus_client import CollectorRegistry

from pipeline.app import Pipeline
from pipeline.config import PipelineConfig, load_config
from pipeline.dashboard.service import Dashboard, DashboardSettings
from pipeline.errors import ConfigError
from pipeline.tools.broker import EmbeddedBroker, free_port

log = logging.getLogger(__name__)

SHIPPED_WEIGHTS = Path(__file__).parent.parent / "assets" / "vap-shapes-seg.pt"
UNTRAINED_FALLBACK = "yolo11n-seg.yaml"
_SUMMARY_EVERY_S = 2.0


@dataclass(frozen=True)
class DemoClip:
    name: str
    width: int
    height: int
    seed: int


DEMO_CLIPS = (
    DemoClip("demo-street", 640, 360, 9001),
    DemoClip("demo-portrait", 480, 640, 9002),
    DemoClip("demo-yard", 640, 480, 9003),
)
_CLIP_FRAMES = 150
_CLIP_FPS = 10.0


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vap" / "demo-clips-v1"


def ensure_clips(directory: Path) -> None:
    """Render the sample clips once; later demos reuse them."""
    from pipeline.tools.synth.clips import ground_truth_path, write_clip
    from pipeline.tools.synth.world import SceneSpec

    for clip in DEMO_CLIPS:
        path = directory / f"{clip.name}.mp4"
        if path.is_file():
            continue
        print(f"  generating sample clip {path.name} ({clip.width}x{clip.height}, {_CLIP_FRAMES} frames)...",
              flush=True)
        spec = SceneSpec(width=clip.width, height=clip.height, n_frames=_CLIP_FRAMES, fps=_CLIP_FPS, seed=clip.seed)
        partial = path.with_suffix(".partial.mp4")
        write_clip(partial, spec)
        partial.rename(path)
        ground_truth_path(partial).rename(ground_truth_path(path))


def demo_config(clips: Path, bootstrap: str, weights: str, overrides: list[str]) -> PipelineConfig:
    text = resources.files("pipeline.tools").joinpath("demo.yaml").read_text(encoding="utf-8")
    environ = dict(os.environ)
    environ.update(VAP_DEMO_DIR=str(clips), VAP_DEMO_BOOTSTRAP=bootstrap, VAP_DEMO_WEIGHTS=weights)
    return load_config(None, overrides, text=text, environ=environ)


class LiveSummary:
    """Prints per-stream frames/s, detections per frame and latency from the metrics registry."""

    def __init__(self, registry: CollectorRegistry, stream_ids: list[str]) -> None:
        self._registry = registry
        self._stream_ids = stream_ids
        self._previous = {stream_id: (0.0, 0.0, 0.0, 0.0) for stream_id in stream_ids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-summary", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Safe whether or not `start` ran, so a demo that failed to start still cleans up."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=5)

    def _value(self, name: str, **labels: str) -> float:
        return self._registry.get_sample_value(name, labels) or 0.0

    def _detections(self, stream_id: str) -> float:
        total = 0.0
        for metric in self._registry.collect():
            if metric.name == "vap_detections":
                total += sum(s.value for s in metric.samples
                             if s.name.endswith("_total") and s.labels.get("stream") == stream_id)
        return total

    def _run(self) -> None:
        while not self._stop.wait(_SUMMARY_EVERY_S):
            lines = [f"{'stream':<16} {'fps':>6} {'dets/frame':>10} {'latency ms':>10}"]
            sent = self._value("vap_kafka_messages_total", result="sent")
            for stream_id in self._stream_ids:
                processed = self._value("vap_frames_processed_total", stream=stream_id)
                detections = self._detections(stream_id)
                latency_sum = self._value("vap_end_to_end_latency_seconds_sum", stream=stream_id)
                latency_count = self._value("vap_end_to_end_latency_seconds_count", stream=stream_id)
                p_processed, p_detections, p_sum, p_count = self._previous[stream_id]
                self._previous[stream_id] = (processed, detections, latency_sum, latency_count)
                frames = processed - p_processed
                fps = frames / _SUMMARY_EVERY_S
                per_frame = (detections - p_detections) / frames if frames else 0.0
                latency = (latency_sum - p_sum) / (latency_count - p_count) * 1000 if latency_count > p_count else 0
                lines.append(f"{stream_id:<16} {fps:>6.1f} {per_frame:>10.2f} {latency:>10.0f}")
            lines.append(f"{'kafka':<16} {sent:.0f} messages delivered")
            print("\n".join(lines), flush=True)


def count_published(bootstrap: str, topic: str) -> dict[str, int]:
    """Read the topic back from the start: the proof that results reached the broker."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=3000, bootstrap_timeout_ms=10_000)
    per_stream: dict[str, int] = {}
    try:
        for record in consumer:
            key = record.key.decode() if record.key else ""
            per_stream[key] = per_stream.get(key, 0) + 1
    finally:
        consumer.close()
    return per_stream


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_demo(duration_s: float, overrides: list[str]) -> int:
    """The embedded broker runs in its own session, so only this function stops it: a SIGTERM or SIGHUP (a
    closed terminal) outside the pipeline's run unwinds like Ctrl-C instead of ending the process on the
    spot, and during the run any of the three stops the pipeline gracefully first."""
    outer = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _run_demo(duration_s, overrides)
    finally:
        for sig, handler in outer.items():
            signal.signal(sig, handler)


def open_dashboard(bootstrap: str) -> Dashboard | None:
    """The demo's dashboard on port 8080 (VAP_DEMO_DASHBOARD_PORT), or any free port when that one is taken:
    a second demo, or a dashboard already running, must not stop the demo."""
    from pipeline.config import KafkaConfig

    wanted = int(os.environ.get("VAP_DEMO_DASHBOARD_PORT", "8080"))
    settings = DashboardSettings(kafka=KafkaConfig(bootstrap_servers=bootstrap), port=wanted)
    try:
        dashboard = Dashboard(settings)
    except RuntimeError:
        try:
            dashboard = Dashboard(replace(settings, port=0))
        except RuntimeError as error:
            print(f"  (no dashboard: {error})", flush=True)
            return None
    return dashboard


def _run_demo(duration_s: float, overrides: list[str]) -> int:
    """The dashboard's URL comes first: it is what a new user opens. Its server starts once the broker is up."""
    broker_port = free_port()
    dashboard = open_dashboard(f"127.0.0.1:{broker_port}")
    if dashboard is not None:
        print(f"vap demo: open the dashboard: {dashboard.url}", flush=True)
    try:
        return _run_pipeline_demo(duration_s, overrides, broker_port, dashboard)
    finally:
        if dashboard is not None:
            dashboard.stop()


def _run_pipeline_demo(duration_s: float, overrides: list[str], broker_port: int, dashboard: Dashboard | None) -> int:
    print("vap demo: sample clips -> bundled model -> embedded Kafka broker", flush=True)
    clips = cache_dir()
    clips.mkdir(parents=True, exist_ok=True)
    ensure_clips(clips)
    if SHIPPED_WEIGHTS.is_file():
        weights = str(SHIPPED_WEIGHTS)
        print(f"  model: {SHIPPED_WEIGHTS.name} (trained on the synthetic shapes world: circle, square, triangle)")
    else:
        weights = UNTRAINED_FALLBACK
        print(f"  model: {UNTRAINED_FALLBACK}, RANDOMLY INITIALISED (no trained model is bundled yet): "
              "expect no real detections")
    with EmbeddedBroker(port=broker_port) as broker:
        print(f"  embedded broker on {broker.bootstrap_servers}", flush=True)
        if dashboard is not None:
            dashboard.start()
        try:
            config = demo_config(clips, broker.bootstrap_servers, weights, overrides)
        except ConfigError as error:
            for line in error.lines():
                print(f"invalid demo override: {line}", file=sys.stderr)
            return 2
        pipeline = Pipeline(config)

        def request_stop(_signum: int, _frame: FrameType | None) -> None:
            pipeline.request_stop()

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        summary = LiveSummary(pipeline.registry, [stream.id for stream in config.streams])
        try:
            started = time.monotonic()
            try:
                pipeline.start()
            except Exception as error:
                # No HTTP server means its port could not be bound: the usual case is a second demo.
                hint = "" if pipeline.http is not None else (
                    "; set VAP_DEMO_HTTP_PORT to a free port (0 picks one) and run it again, "
                    "e.g. VAP_DEMO_HTTP_PORT=0 vap demo"
                )
                print(f"vap demo: cannot start: {error}{hint}", file=sys.stderr, flush=True)
                log.debug("start failure", exc_info=True)
                return 1
            assert pipeline.http is not None
            print(f"  warm in {time.monotonic() - started:.1f} s; metrics on "
                  f"http://{config.http.host}:{pipeline.http.port}/metrics; running for {duration_s:.0f} s",
                  flush=True)
            summary.start()
            pipeline.wait(duration_s)
        finally:
            summary.stop()
            pipeline.stop()
            if dashboard is not None:
                dashboard.stop()  # before its broker goes
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        published = count_published(broker.bootstrap_servers, config.kafka.topic)
    total = sum(published.values())
    detail = ", ".join(f"{stream}: {count}" for stream, count in sorted(published.items()))
    print(f"published {total} messages to topic '{config.kafka.topic}' ({detail}); broker stopped", flush=True)
    return 0 if total > 0 else 1
