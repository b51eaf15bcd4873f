"""SIGTERM ends vap with exit 0 within 10 s in the hard cases: a camera that takes the connection and never
answers, a broker that does the same, and a model stuck in the middle of a batch."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.app import Pipeline
from pipeline.tools.broker import EmbeddedBroker, free_port
from tests.conftest import metric_value, scrape, stop_with_sigterm, vap_process, wait_for, write_moving_box_clip
from tests.fakes import InstantDetector, config_with, fake_kafka

REPO = Path(__file__).resolve().parent.parent


class SilentServer:
    """Accepts every TCP connection and never says a word: a camera or broker that hangs after the handshake."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="silent-server", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self._held.append(connection)

    @property
    def connections(self) -> int:
        return len(self._held)

    def close(self) -> None:
        self._listener.close()
        for connection in self._held:
            connection.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def write_config(tmp_path: Path, tree: dict[str, Any]) -> Path:
    path = tmp_path / "vap.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def base_config(tmp_path: Path, model_weights: str, bootstrap: str, port: int) -> dict[str, Any]:
    clip = write_moving_box_clip(tmp_path / "clip.mp4", 96, 64, frames=20)
    return {
        "streams": [{"id": "file", "url": str(clip), "loop": True}],
        "model": {"weights": model_weights, "imgsz": 160},
        "batching": {"max_batch": 2},
        "kafka": {"bootstrap_servers": bootstrap},
        "http": {"host": "127.0.0.1", "port": port},
    }


def inferring(port: int) -> bool:
    try:
        return (metric_value(scrape(port), "vap_stage_seconds_count", stage="infer") or 0) > 0
    except OSError:
        return False


@pytest.mark.parametrize("decoder_processes", [0, 2], ids=["in-process", "decoder-processes"])
def test_sigterm_stops_within_10_s_while_a_camera_holds_its_connection_open_without_answering(
    tmp_path: Path, model_weights: str, broker: EmbeddedBroker, silent_server: SilentServer, decoder_processes: int
) -> None:
    port = free_port()
    tree = base_config(tmp_path, model_weights, broker.bootstrap_servers, port)
    tree["decoding"] = {"processes": decoder_processes}
    tree["streams"].append({"id": "mute", "url": f"rtsp://127.0.0.1:{silent_server.port}/live",
                            "open_timeout_ms": 60_000, "stall_timeout_s": 60})
    with vap_process(["run", "-c", str(write_config(tmp_path, tree))]) as process:
        wait_for(lambda: inferring(port) and silent_server.connections >= 1, 90,
                 "vap never ran, or never reached the silent camera's RTSP open")
        stop_with_sigterm(process)


def test_sigterm_stops_within_10_s_while_the_broker_holds_its_connections_open_without_answering(
    tmp_path: Path, model_weights: str, silent_server: SilentServer
) -> None:
    port = free_port()
    tree = base_config(tmp_path, model_weights, f"127.0.0.1:{silent_server.port}", port)
    with vap_process(["run", "-c", str(write_config(tmp_path, tree))]) as process:
        wait_for(lambda: inferring(port) and silent_server.connections >= 1, 90,
                 "vap never ran, or never connected to the silent broker")
        stop_with_sigterm(process)


STUCK_MODEL_RUN = """
import sys, threading
sys.path.insert(0, {repo!r})
import pipeline.app
from pipeline.cli import entry
from tests.fakes import InstantDetector
never = threading.Event()
pipeline.app._ultralytics_detector = lambda config, device: InstantDetector(never)
sys.argv[1:] = ["run", "-c", {config!r}]
entry()
"""


def test_sigterm_stops_within_10_s_while_the_model_is_stuck_in_a_batch(
    tmp_path: Path, model_weights: str, broker: EmbeddedBroker
) -> None:
    port = free_port()
    path = write_config(tmp_path, base_config(tmp_path, model_weights, broker.bootstrap_servers, port))
    script = STUCK_MODEL_RUN.format(repo=str(REPO), config=str(path))
    from subprocess import Popen

    process = Popen([sys.executable, "-c", script])
    try:
        def stuck() -> bool:
            try:
                text = scrape(port)
            except OSError:
                return False
            return (metric_value(text, "vap_frames_read_total", stream="file") or 0) > 4

        wait_for(stuck, 90, "vap never started reading")
        stop_with_sigterm(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_stop_with_the_model_stuck_counts_every_frame_it_leaves_behind(
    pipelines: list[Pipeline], tmp_path: Path
) -> None:
    never = threading.Event()
    detector = InstantDetector(never)
    clip = write_moving_box_clip(tmp_path / "clip.mp4", 96, 64, frames=40)
    running = Pipeline(config_with([{"id": "cam", "url": str(clip), "realtime": False}]),
                       detector_factory=lambda _config, _device: detector, producer_factory=fake_kafka())
    pipelines.append(running)
    running.start()
    wait_for(lambda: detector.holding.is_set() and running.hub.depth() > 0, 10, "the model never got a batch")
    started = time.monotonic()
    running.stop()
    assert time.monotonic() - started < 10
    totals = running.ledger.totals("cam")
    shutdown = running.registry.get_sample_value("vap_frames_dropped_total", {"stream": "cam", "reason": "shutdown"})
    assert totals is not None and totals.read > 0 and totals.in_flight == 0, totals
    assert totals.published == 0 and totals.dropped == totals.read == shutdown, "the held batch and the rest"
