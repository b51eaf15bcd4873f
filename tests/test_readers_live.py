"""Readers against real sockets and real files: dead cameras never block, files lose nothing."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipeline.tools.broker import EmbeddedBroker, free_port
from tests.conftest import (
    ConfigFactory,
    metric_value,
    read_topic,
    run_to_completion,
    sample,
    scrape,
    stop_with_sigterm,
    unused_topic,
    vap_process,
    write_moving_box_clip,
)


@pytest.fixture
def silent_listener() -> Iterator[str]:
    """A TCP port that accepts connections and never says a word, like a camera that hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"rtsp://127.0.0.1:{server.getsockname()[1]}/stream"
    stop.set()
    thread.join(2)
    for connection in accepted:
        connection.close()
    server.close()


def test_dead_cameras_never_block_start_or_stop_and_the_good_stream_publishes(
    tmp_path: Path, broker: EmbeddedBroker, clips: dict[str, Path], model_weights: str, silent_listener: str
) -> None:
    topic = unused_topic("dead-cams")
    port = free_port()
    config = {
        "streams": [
            {"id": "closed-port", "url": f"rtsp://127.0.0.1:{free_port()}/stream", "open_timeout_ms": 3000},
            {"id": "hangs", "url": silent_listener, "open_timeout_ms": 3000},
            {"id": "good", "url": str(clips["landscape"]), "loop": True},
        ],
        "model": {"weights": model_weights, "imgsz": 160},
        "batching": {"max_batch": 2},
        "kafka": {"bootstrap_servers": broker.bootstrap_servers, "topic": topic},
        "http": {"host": "127.0.0.1", "port": port},
    }
    path = tmp_path / "dead.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with vap_process(["run", "-c", str(path)], env=dict(os.environ)) as process:
        deadline = time.monotonic() + 90
        processed = 0.0
        while time.monotonic() < deadline and processed < 10:
            with contextlib.suppress(OSError):
                processed = metric_value(scrape(port), "vap_frames_processed_total", stream="good") or 0
            time.sleep(0.25)
        metrics = scrape(port)
        assert processed >= 10
        assert metric_value(metrics, "vap_stream_up", stream="good") == 1
        assert metric_value(metrics, "vap_stream_up", stream="closed-port") == 0
        assert metric_value(metrics, "vap_stream_up", stream="hangs") == 0
        stop_with_sigterm(process)
    messages = read_topic(broker.bootstrap_servers, topic, expected=10, timeout_s=10)
    assert {record.key for record in messages} == {b"good"}


def test_realtime_file_feeding_faster_than_the_model_drops_old_frames_and_keeps_latency_bounded(
    tmp_path: Path, broker: EmbeddedBroker, make_config: ConfigFactory
) -> None:
    # 1000 frames/s: faster than any runtime runs the model at 320 px on a few cores
    fast_clip = write_moving_box_clip(tmp_path / "fast.mp4", 320, 192, frames=400, fps=1000.0)
    slow_clip = write_moving_box_clip(tmp_path / "slow.mp4", 320, 192, frames=20, fps=5.0)
    config = make_config(
        [{"id": "fast", "url": str(fast_clip)}, {"id": "slow", "url": str(slow_clip)}],
        broker.bootstrap_servers, unused_topic("fast"),
        batching={"max_batch": 2, "queue_size": 2},
        model={"warmup": True, "imgsz": 320},
    )
    pipeline = run_to_completion(config)
    dropped = sum(sample(pipeline, "vap_frames_dropped_total", stream="fast", reason=reason)
                  for reason in ("queue_full", "stale"))
    assert dropped > 0, "a source faster than the model must lose its oldest frames"
    assert sample(pipeline, "vap_frames_processed_total", stream="slow") == 20
    registry = pipeline.registry
    bucket = registry.get_sample_value("vap_end_to_end_latency_seconds_bucket", {"stream": "fast", "le": "1.0"})
    count = registry.get_sample_value("vap_end_to_end_latency_seconds_count", {"stream": "fast"})
    assert count and bucket is not None and bucket / count >= 0.99, f"{bucket} of {count} under 1 s"
