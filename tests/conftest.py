"""Shared fixtures and helpers: a real Kafka-protocol broker, small video files, config builders, polling,
metric readers, and running the pipeline in process or as a `python -m pipeline` subprocess."""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import orjson
import pytest
from kafka import KafkaConsumer

from pipeline.app import Pipeline
from pipeline.config import PipelineConfig, parse_config
from pipeline.inference.offline import keep_model_libraries_offline
from pipeline.tools.broker import EmbeddedBroker, free_port
from pipeline.tools.demo import SHIPPED_WEIGHTS, UNTRAINED_FALLBACK

pytest_plugins = ["tests.servers.fixtures"]

keep_model_libraries_offline()  # as `vap` does: the tests' model libraries never call out either

CLIP_FRAMES = 12


@pytest.fixture(autouse=True)
def _root_logger_as_it_was() -> Iterator[None]:
    """`vap`'s entry point points the root logger at the stderr of the moment. Called in-process, that is a
    test's capture, closed once the test ends, and every later test in the process would log into it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = [handler for handler in root.handlers
                        if handler in handlers or type(handler) is not logging.StreamHandler]
    root.setLevel(level)


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as running:
        yield running


def write_moving_box_clip(path: Path, width: int, height: int, frames: int = CLIP_FRAMES, fps: float = 10.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (width, height))
    assert writer.isOpened(), f"cannot write {path}"
    for index in range(frames):
        image = np.full((height, width, 3), 40, np.uint8)
        x = 10 + index * 6
        cv2.rectangle(image, (x, height // 3), (x + 40, height // 3 + 40), (0, 200, 255), -1)
        writer.write(image)
    writer.release()
    return path


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A landscape and a portrait clip, so image sizes can be told apart in messages."""
    directory = tmp_path_factory.mktemp("clips")
    return {
        "landscape": write_moving_box_clip(directory / "landscape.mp4", 320, 192),
        "portrait": write_moving_box_clip(directory / "portrait.mp4", 160, 256),
    }


@pytest.fixture(scope="session")
def model_weights() -> str:
    """The bundled trained model when present; otherwise an untrained one built from Ultralytics' YAML."""
    return str(SHIPPED_WEIGHTS) if SHIPPED_WEIGHTS.is_file() else UNTRAINED_FALLBACK


ConfigFactory = Callable[..., PipelineConfig]


@pytest.fixture
def make_config(model_weights: str) -> ConfigFactory:
    def build(streams: list[dict[str, Any]], bootstrap: str, topic: str, **sections: Any) -> PipelineConfig:
        tree: dict[str, Any] = {
            "streams": streams,
            "model": {"weights": model_weights, "imgsz": 160, "warmup": False},
            "batching": {"max_batch": 4, "max_wait_ms": 10},
            "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "linger_ms": 0},
            "http": {"host": "127.0.0.1", "port": 0},
        }
        for name, values in sections.items():
            tree.setdefault(name, {}).update(values)
        return parse_config(tree)

    return build


def unused_topic(name: str) -> str:
    return f"{name}-{time.monotonic_ns()}"


def closed_port_address() -> str:
    return f"127.0.0.1:{free_port()}"


def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0,
               group: str | None = None) -> list[Any]:
    """Consume until `expected` messages arrived or the timeout passed (then return what came)."""
    extra: dict[str, Any] = {}
    if group is not None:
        extra = {"group_id": group, "session_timeout_ms": 3000, "heartbeat_interval_ms": 1000,
                 "max_poll_interval_ms": 3000}
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, **extra)
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
    finally:
        consumer.close()
    return records


def decode(record: Any) -> dict[str, Any]:
    message: dict[str, Any] = orjson.loads(record.value)
    return message


def http_call(port: int, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    """A JSON request to the pipeline's HTTP port: the status and the decoded body (None when empty)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     data=None if body is None else orjson.dumps(body))
    request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, orjson.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        return error.code, orjson.loads(error.read() or b"null")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
    return text


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, matched by name and a subset of labels."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample_name = head.split("{", 1)[0]
        if sample_name != name:
            continue
        if all(f'{key}="{val}"' in head for key, val in labels.items()):
            return float(value)
    return None


def _holds(condition: Callable[[], object], ignore: tuple[type[BaseException], ...]) -> bool:
    try:
        return bool(condition())
    except ignore:
        return False


def wait_until(condition: Callable[[], object], timeout_s: float = 10.0, interval_s: float = 0.01,
               ignore: tuple[type[BaseException], ...] = ()) -> bool:
    """Poll until `condition` holds; False if it still does not after `timeout_s`.

    Exceptions of the types in `ignore` raised by the condition count as "not yet".
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _holds(condition, ignore):
            return True
        time.sleep(interval_s)
    return _holds(condition, ignore)


def wait_for(condition: Callable[[], object], timeout_s: float, message: str,
             ignore: tuple[type[BaseException], ...] = ()) -> float:
    """Poll until `condition` holds and return the seconds it took; AssertionError(message) after `timeout_s`."""
    started = time.monotonic()
    if not wait_until(condition, timeout_s, interval_s=0.05, ignore=ignore):
        raise AssertionError(message)
    return time.monotonic() - started


def sample(pipeline: Pipeline, name: str, **labels: str) -> float:
    """One sample from the pipeline's own registry; 0.0 while it does not exist yet."""
    return pipeline.registry.get_sample_value(name, labels) or 0.0


def run_to_completion(config: PipelineConfig, timeout_s: float = 60.0,
                      before_stop: Callable[[Pipeline], object] | None = None) -> Pipeline:
    """Run a pipeline over sources that end; assert they all finished within `timeout_s`, then stop it.

    `before_stop` is called with the finished, still running pipeline (to scrape /metrics, say).
    """
    pipeline = Pipeline(config)
    pipeline.start()
    try:
        assert pipeline.wait(duration_s=timeout_s) == "all sources finished"
        if before_stop is not None:
            before_stop(pipeline)
    finally:
        pipeline.stop()
    return pipeline


@contextlib.contextmanager
def vap_process(args: list[str], **popen_kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m pipeline *args` as a subprocess, killed on the way out if it is still running."""
    process: subprocess.Popen[bytes] = subprocess.Popen([sys.executable, "-m", "pipeline", *args], **popen_kwargs)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def stop_with_sigterm(process: subprocess.Popen[bytes], within_s: float = 10.0) -> None:
    """SIGTERM must make the process exit with code 0 within `within_s`."""
    stopped_at = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=within_s) == 0
    assert time.monotonic() - stopped_at < within_s


@pytest.fixture
def pipelines() -> Iterator[list[Pipeline]]:
    """Pipelines a test made, stopped however the test ends."""
    made: list[Pipeline] = []
    yield made
    for pipeline in made:
        pipeline.stop()


Found = dict[tuple[str, int], list[tuple[str, list[float], bool]]]


def published_detections(broker: EmbeddedBroker, topic: str, expected: int) -> Found:
    """Each frame's detections on `topic`: label, box and whether it has a mask, by (stream, frame)."""
    found = {}
    for record in read_topic(broker.bootstrap_servers, topic, expected):
        message = decode(record)
        found[(message["stream_id"], message["frame_id"])] = [
            (d["label"], [d["bbox"][k] for k in ("x1", "y1", "x2", "y2")], d["mask"] is not None)
            for d in message["detections"]]
    return found


def publish_clips(broker: EmbeddedBroker, clips: dict[str, Path], make_config: ConfigFactory, name: str,
                  before_stop: Callable[[Pipeline], object] | None = None,
                  **sections: Any) -> tuple[Pipeline, Found]:
    """The session's two clips through a pipeline with `sections` of config, to a topic of their own: every
    frame read is published, and each frame's detections are read back (to compare two ways of running)."""
    streams = [{"id": f"cam-{clip}", "url": str(path), "realtime": False} for clip, path in clips.items()]
    topic = unused_topic(name)
    pipeline = run_to_completion(make_config(streams, broker.bootstrap_servers, topic, **sections),
                                 before_stop=before_stop)
    totals = pipeline.ledger.overall()
    assert totals.read == totals.published == 2 * CLIP_FRAMES and totals.in_flight == 0
    return pipeline, published_detections(broker, topic, 2 * CLIP_FRAMES)


def assert_same_detections(found: Found, expected: Found, frames: int) -> None:
    """Two runs over the same clips found the same things in every frame, and found things at all."""
    assert found.keys() == expected.keys() and len(expected) == frames
    for frame, expected_detections in expected.items():
        detections = found[frame]
        assert [(label, mask) for label, _, mask in detections] == \
            [(label, mask) for label, _, mask in expected_detections], frame
        # Frames batched differently (readers race) differ in the last float bits of the model's output.
        for (_, box, _), (_, expected_box, _) in zip(detections, expected_detections, strict=True):
            assert np.allclose(box, expected_box, atol=0.5), (frame, box, expected_box)
    assert sum(len(detections) for detections in expected.values()) >= frames // 2, "the clips have things to find"
