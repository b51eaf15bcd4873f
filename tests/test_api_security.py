"""The control API's access rules: the decisions as functions, then each rule over real HTTP (the real server
and app, with a stand-in for the pipeline behind them; tests/test_control_api.py checks the token on a real
pipeline)."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from pipeline.config import HttpConfig, StreamConfig, parse_config
from pipeline.errors import ConfigError
from pipeline.ops.access import api_refusal, body_refusal, host_allowed, host_name
from pipeline.ops.http import HttpServer, Probe, build_app

OWN = frozenset({"localhost", "camera-box"})


@pytest.mark.parametrize(("header", "allowed"), [
    ("127.0.0.1:9108", True), ("[::1]:9108", True), ("10.0.0.7", True), ("localhost:9108", True),
    ("Camera-Box.", True), ("vap.example.com", True), ("a.cams.example.com:443", True),
    ("cams.example.com", False), ("evil.example:9108", False), ("localhost.evil.example", False), ("", False),
    (None, False),
])
def test_which_host_headers_the_api_answers(header: str | None, allowed: bool) -> None:
    assert host_allowed(header, OWN, ["vap.example.com", "*.cams.example.com"]) is allowed


def test_host_names_lose_port_brackets_case_and_trailing_dot() -> None:
    assert [host_name(h) for h in ("A.Example.:80", "[::1]:9108", "10.0.0.1")] == ["a.example", "::1", "10.0.0.1"]


def test_the_api_decision() -> None:
    def decide(path: str, host: str | None = "localhost", authorization: str | None = None,
               token: str | None = "t") -> int | None:
        refusal = api_refusal(path, host, authorization, token, OWN, [])
        return None if refusal is None else refusal.status

    assert decide("/metrics", host="evil.example") is None  # probes and metrics stay open
    assert decide("/healthz", host=None) is None
    assert decide("/api/v1/streams") == 401
    assert decide("/api/v1/streams", authorization="Bearer t") is None
    assert decide("/api/v1/streams", authorization="Bearer x") == 401
    assert decide("/api/v1/streams", host="evil.example", authorization="Bearer t") == 400  # the host first
    assert decide("/api/v1/streams", token=None) is None
    assert decide("/api/v1/streams", host="evil.example", token=None) == 400
    limit = 1000
    assert body_refusal("999", False, limit) is None and body_refusal(None, False, limit) is None
    cases: list[tuple[str | None, bool]] = [("1001", False), (None, True), ("x", False)]
    statuses = [getattr(body_refusal(length, chunked, limit), "status", None) for length, chunked in cases]
    assert statuses == [413, 411, 400]


def test_a_config_with_more_streams_than_max_streams_is_refused_naming_the_key() -> None:
    streams = [{"id": f"c{index}", "url": f"rtsp://192.0.2.1/{index}"} for index in range(3)]
    with pytest.raises(ConfigError) as raised:
        parse_config({"streams": streams, "http": {"max_streams": 2}})
    ((key, message),) = raised.value.problems
    assert key == "streams" and "http.max_streams" in message


class StandIn:
    """The pipeline's side of the HTTP layer, recording what it was asked."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.streams: list[dict[str, Any]] = [{"id": "one"}]
        self.added: list[str] = []

    def health(self) -> Probe:
        return Probe(True, {"ok": True})

    def readiness(self) -> Probe:
        return Probe(True, {"ok": True})

    def status(self) -> dict[str, Any]:
        return {"ok": True}

    def list_streams(self) -> list[dict[str, Any]]:
        return self.streams

    def add_stream(self, stream: StreamConfig) -> None:
        self.added.append(stream.id)
        self.streams.append({"id": stream.id})

    def remove_stream(self, stream_id: str) -> None:
        pass

    def fleet_info(self) -> dict[str, Any] | None:
        return None


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[tuple[int, StandIn]]:
    settings = getattr(request, "param", {})
    control = StandIn()
    config = HttpConfig(host="127.0.0.1", port=0, **settings)
    running = HttpServer("127.0.0.1", 0, build_app(control, config))
    running.start()
    try:
        yield running.port, control
    finally:
        running.stop()


def send(port: int, method: str, path: str, host: str | None = None, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.putrequest(method, path, skip_host=True)
        connection.putheader("Host", host if host is not None else f"127.0.0.1:{port}")
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if body is not None and "Transfer-Encoding" not in (headers or {}):
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        raw = response.read()
        return response.status, orjson.loads(raw) if raw and raw[:1] in b"{[" else raw
    finally:
        connection.close()


STREAM = orjson.dumps({"id": "two", "url": "rtsp://192.0.2.9/live"})
JSON = {"Content-Type": "application/json"}


def test_dns_rebinding_a_foreign_host_cannot_add_a_camera_on_a_loopback_api(server: tuple[int, StandIn]) -> None:
    port, control = server
    code, body = send(port, "POST", "/api/v1/streams", host="rebind.evil.example", body=STREAM, headers=JSON)
    assert code == 400 and "rebind.evil.example" in body["detail"] and control.added == []
    assert send(port, "GET", "/api/v1/streams", host="rebind.evil.example:80")[0] == 400
    assert send(port, "GET", "/healthz", host="rebind.evil.example")[0] == 200  # probes stay open
    assert send(port, "POST", "/api/v1/streams", host=f"localhost:{port}", body=STREAM, headers=JSON)[0] == 201
    assert control.added == ["two"]


@pytest.mark.parametrize("server", [{"auth_token": "s3cret", "allowed_hosts": ["vap.example.com"]}], indirect=True)
def test_a_token_guards_every_api_route_and_allowed_hosts_are_answered(server: tuple[int, StandIn]) -> None:
    port, _ = server
    bearer = {"Authorization": "Bearer s3cret"}
    for path in ("/api/v1/streams", "/api/v1/status", "/api/v1/openapi.json"):
        assert send(port, "GET", path)[0] == 401, path
        assert send(port, "GET", path, headers=bearer)[0] == 200, path
    assert send(port, "GET", "/api/v1/streams", host="vap.example.com", headers=bearer)[0] == 200
    assert send(port, "GET", "/api/v1/streams", host="other.example.com", headers=bearer)[0] == 400
    assert send(port, "GET", "/metrics")[0] == 200 and send(port, "GET", "/readyz")[0] == 200
    assert send(port, "GET", "/docs")[0] == 404 and send(port, "GET", "/openapi.json")[0] == 404


@pytest.mark.parametrize("server", [{"max_body_bytes": 2048, "max_streams": 2}], indirect=True)
def test_bodies_are_capped_and_so_are_the_streams_one_process_runs(server: tuple[int, StandIn]) -> None:
    port, control = server
    padded = orjson.dumps({"id": "big", "url": "rtsp://192.0.2.9/" + "x" * 4000})
    code, body = send(port, "POST", "/api/v1/streams", body=padded, headers=JSON)
    assert code == 413 and "http.max_body_bytes" in body["detail"]
    chunked = {**JSON, "Transfer-Encoding": "chunked"}
    assert send(port, "POST", "/api/v1/streams", body=b"5\r\nhello\r\n0\r\n\r\n", headers=chunked)[0] == 411
    assert send(port, "POST", "/api/v1/streams", body=STREAM, headers=JSON)[0] == 201  # the second stream
    code, body = send(port, "POST", "/api/v1/streams", body=orjson.dumps({"id": "three", "url": "rtsp://h/x"}),
                      headers=JSON)
    assert code == 409 and "http.max_streams" in body["detail"] and control.added == ["two"]
