"""The control API over real HTTP: streams added and removed at run time, validation and authorisation."""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.app import Pipeline
from pipeline.config import StreamConfig
from pipeline.tools.broker import EmbeddedBroker
from tests.conftest import ConfigFactory, decode, http_call, read_topic, sample, unused_topic, wait_for
from tests.servers.fixtures import MjpegServerFactory

TOKEN = "s3cret-token"
PROCESSED = "vap_frames_processed_total"


def call(port: int, method: str, path: str, body: Any = None, token: str | None = TOKEN) -> tuple[int, Any]:
    return http_call(port, method, path, body, token)


def test_streams_added_and_removed_at_run_time_while_another_never_pauses(
    broker: EmbeddedBroker, clips: dict[str, Path], make_config: ConfigFactory,
    mjpeg_server_factory: MjpegServerFactory,
) -> None:
    topic = unused_topic("api")
    config = make_config([{"id": "steady", "url": str(clips["landscape"]), "loop": True}],
                         broker.bootstrap_servers, topic, http={"auth_token": TOKEN}, model={"warmup": True})
    pipeline = Pipeline(config)
    pipeline.start()
    assert pipeline.http is not None
    port = pipeline.http.port
    try:
        wait_for(lambda: sample(pipeline, PROCESSED, stream="steady") >= 5, 30, "steady stream did not start")
        camera = mjpeg_server_factory(clip=clips["portrait"])  # the API adds network cameras only
        code, body = call(port, "POST", "/api/v1/streams", {"id": "added", "url": camera.url})
        assert (code, body["id"]) == (201, "added")
        wait_for(lambda: sample(pipeline, PROCESSED, stream="added") >= 10, 30, "the added stream published nothing")
        code, listed = call(port, "GET", "/api/v1/streams")
        assert code == 200 and {entry["id"] for entry in listed} == {"steady", "added"}
        code, _ = call(port, "DELETE", "/api/v1/streams/added")
        assert code == 204
        removed_at = sample(pipeline, PROCESSED, stream="added")
        steady_at_removal = sample(pipeline, PROCESSED, stream="steady")
        wait_for(lambda: sample(pipeline, PROCESSED, stream="steady") >= steady_at_removal + 10, 30,
                 "steady stream stalled")
        assert sample(pipeline, PROCESSED, stream="added") <= removed_at + 4, (
            "a removed stream keeps no more than its buffer")
        assert call(port, "DELETE", "/api/v1/streams/added")[0] == 404
        code, status = call(port, "GET", "/api/v1/status")
        assert code == 200 and status["streams"] == 1 and status["ready"] is True
    finally:
        pipeline.stop()
    messages = [decode(r) for r in read_topic(broker.bootstrap_servers, topic, expected=pipeline.processed)]
    assert any(m["stream_id"] == "added" for m in messages)
    steady = sorted(datetime.fromisoformat(m["captured_at"]) for m in messages if m["stream_id"] == "steady")
    worst_gap = max((b - a).total_seconds() for a, b in itertools.pairwise(steady))
    assert worst_gap < 1.0, f"the steady stream paused {worst_gap:.2f} s while streams were added and removed"


def test_invalid_stream_body_gets_422_naming_the_field_and_no_token_gets_401(
    broker: EmbeddedBroker, clips: dict[str, Path], make_config: ConfigFactory
) -> None:
    config = make_config([{"id": "steady", "url": str(clips["landscape"]), "loop": True}],
                         broker.bootstrap_servers, unused_topic("api-422"), http={"auth_token": TOKEN})
    pipeline = Pipeline(config)
    pipeline.start()
    assert pipeline.http is not None
    port = pipeline.http.port
    try:
        code, body = call(port, "POST", "/api/v1/streams", {"id": "bad id!", "url": "ftp://x", "fps": -1})
        assert code == 422
        locations = {tuple(error["loc"]) for error in body["detail"]}
        assert {("body", "id"), ("body", "url"), ("body", "fps")} <= locations
        zone = {"id": "dock", "polygon": [[0, 0], [1, 0], [1, 1]]}
        twice = {"id": "gate", "url": str(clips["portrait"]), "analytics": {"zones": [zone, zone]}}
        code, body = call(port, "POST", "/api/v1/streams", twice)
        assert code == 422 and [error["loc"] for error in body["detail"]] == [["body", "analytics", "zones", 1, "id"]]
        new_stream = {"id": "x", "url": str(clips["portrait"])}
        assert call(port, "POST", "/api/v1/streams", new_stream, token=None)[0] == 401
        assert call(port, "POST", "/api/v1/streams", new_stream, token="wrong")[0] == 401
        assert call(port, "DELETE", "/api/v1/streams/steady", token=None)[0] == 401
        assert call(port, "POST", "/api/v1/streams", {"id": "steady", "url": "rtsp://192.0.2.1/x"})[0] == 409
        for local in (str(clips["portrait"]), f"file://{clips['portrait']}", "/dev/video0", "0"):
            code, body = call(port, "POST", "/api/v1/streams", {"id": "local", "url": local})
            assert code == 422 and "network cameras only" in body["detail"], local
        assert call(port, "GET", "/api/v1/streams", token=None)[0] == 401  # reads need the token too
        assert call(port, "GET", "/openapi.json", token=None)[0] == 404  # no docs outside /api/
        assert call(port, "GET", "/docs", token=None)[0] == 404
        assert call(port, "GET", "/api/v1/openapi.json", token=None)[0] == 401
        code, openapi = call(port, "GET", "/api/v1/openapi.json")
        assert code == 200 and "/api/v1/streams" in openapi["paths"]
        assert call(port, "GET", "/healthz", token=None)[0] == 200
    finally:
        pipeline.stop()


def test_without_a_token_changes_are_refused_on_a_non_loopback_host(
    broker: EmbeddedBroker, clips: dict[str, Path], make_config: ConfigFactory
) -> None:
    config = make_config([{"id": "steady", "url": str(clips["landscape"]), "loop": True}],
                         broker.bootstrap_servers, unused_topic("api-403"), http={"host": "0.0.0.0"})
    pipeline = Pipeline(config)
    pipeline.start()
    assert pipeline.http is not None
    try:
        code, body = call(pipeline.http.port, "DELETE", "/api/v1/streams/steady", token=None)
        assert code == 403 and "auth_token" in body["detail"]
        assert "steady" in pipeline.readers
    finally:
        pipeline.stop()


def test_a_stream_added_again_while_its_old_reader_is_stuck_in_an_open_keeps_its_metrics_and_frames(
    broker: EmbeddedBroker, clips: dict[str, Path], make_config: ConfigFactory
) -> None:
    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept_and_say_nothing() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(silent.accept()[0])

    threading.Thread(target=accept_and_say_nothing, daemon=True).start()
    config = make_config([{"id": "steady", "url": str(clips["landscape"]), "loop": True}],
                         broker.bootstrap_servers, unused_topic("readd"))
    pipeline = Pipeline(config)
    pipeline.start()
    try:
        camera = StreamConfig.model_validate(
            {"id": "cam", "url": f"rtsp://127.0.0.1:{silent.getsockname()[1]}/live", "open_timeout_ms": 3000})
        pipeline.add_stream(camera)
        wait_for(lambda: held, 10, "the camera's reader never connected")
        pipeline.remove_stream("cam")
        pipeline.add_stream(StreamConfig.model_validate({"id": "cam", "url": str(clips["portrait"]), "loop": True}))
        wait_for(lambda: sample(pipeline, "vap_frames_read_total", stream="cam") > 0, 10, "new stream read nothing")
        time.sleep(4.0)  # the old reader's open times out and it ends
        read_before = sample(pipeline, "vap_frames_read_total", stream="cam")
        wait_for(lambda: sample(pipeline, "vap_frames_read_total", stream="cam") > read_before, 5,
                 "the new stream's frames are no longer counted once the old reader ended")
        assert sample(pipeline, "vap_stream_up", stream="cam") == 1
    finally:
        pipeline.stop()
        silent.close()
        for connection in held:
            connection.close()


class StuckReader:
    """A reader blocked in a camera's open: it never ends within a join."""

    def __init__(self, stream_id: str) -> None:
        self.config = StreamConfig.model_validate({"id": stream_id, "url": "rtsp://192.0.2.1/s"})

    def stop(self) -> None:
        pass

    def join(self, timeout: float) -> bool:
        time.sleep(timeout)
        return False


def test_stop_waits_for_stuck_readers_together_not_one_after_another(
    broker: EmbeddedBroker, clips: dict[str, Path], make_config: ConfigFactory
) -> None:
    pipeline = Pipeline(make_config([{"id": "a", "url": str(clips["landscape"])}], broker.bootstrap_servers, "t"))
    pipeline.readers = {f"cam-{index}": StuckReader(f"cam-{index}") for index in range(6)}  # type: ignore[misc]
    started = time.monotonic()
    pipeline.stop()
    assert time.monotonic() - started < 4, "six stuck readers took 2 s each"
