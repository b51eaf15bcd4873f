"""One HTTP port: Prometheus (/metrics), liveness (/healthz), readiness (/readyz) and the control API.

The control API adds and removes streams at run time. Who may call it is decided in `access.py`: with
`http.auth_token` every /api/ route needs `Authorization: Bearer <token>`; without one, changes are refused
unless the server only listens on loopback, so an exposed port never lets strangers add cameras. A Host
header this server does not answer for gets 400 (DNS rebinding). While the pipeline starts (the model
loads) and once it has begun to stop, changes answer 503.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from pipeline import __version__
from pipeline.config import HttpConfig, StreamConfig
from pipeline.errors import NotAcceptingChanges, RegistryUnavailable, StreamExists, UnknownStream
from pipeline.ops.access import api_refusal, body_refusal, own_host_names

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    """A probe's verdict and the JSON body that explains it."""

    ok: bool
    body: dict[str, Any]


class Control(Protocol):
    """What the HTTP layer needs from the running pipeline."""

    registry: CollectorRegistry

    def health(self) -> Probe: ...

    def readiness(self) -> Probe: ...

    def status(self) -> dict[str, Any]: ...

    def list_streams(self) -> list[dict[str, Any]]: ...

    def add_stream(self, stream: StreamConfig) -> None: ...

    def remove_stream(self, stream_id: str) -> None: ...

    def fleet_info(self) -> dict[str, Any] | None: ...


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(control: Control, http: HttpConfig) -> FastAPI:
    """The API's description is at /api/v1/openapi.json, behind the same rules as the API; no docs page, whose
    script would come from a CDN that camera sites often cannot reach."""
    host = http.host
    auth_token = None if http.auth_token is None else http.auth_token.get_secret_value()
    app = FastAPI(title="vap", version=__version__, description="Real-time video analytics pipeline",
                  docs_url=None, redoc_url=None, openapi_url="/api/v1/openapi.json")
    _guard(app, http, auth_token)

    def authorise(request: Request) -> None:
        """Changes without a token only from a server that listens on loopback; the token itself is checked by
        the guard, for every /api/ route."""
        if auth_token is None and not is_loopback(host):
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                "stream changes are disabled: set http.auth_token or listen on loopback")

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(control.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", tags=["probes"])
    def healthz() -> JSONResponse:
        probe = control.health()
        return JSONResponse(probe.body, status_code=200 if probe.ok else 503)

    @app.get("/readyz", tags=["probes"])
    def readyz() -> JSONResponse:
        probe = control.readiness()
        return JSONResponse(probe.body, status_code=200 if probe.ok else 503)

    @app.get("/api/v1/status", tags=["control"])
    def get_status() -> dict[str, Any]:
        return control.status()

    @app.get("/api/v1/streams", tags=["control"])
    def list_streams() -> list[dict[str, Any]]:
        return control.list_streams()

    @app.get("/api/v1/fleet", tags=["control"])
    def get_fleet() -> dict[str, Any]:
        info = control.fleet_info()
        if info is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "fleet mode is off (the config has no fleet: section)")
        return info

    @app.post("/api/v1/streams", status_code=status.HTTP_201_CREATED, tags=["control"],
              dependencies=[Depends(authorise)])
    def add_stream(stream: StreamConfig) -> dict[str, Any]:
        if stream.kind != "live":  # else a token holder could read (and publish) the host's files and devices
            raise HTTPException(422, "the control API adds network cameras only (rtsp://, rtsps://, http://, "
                                     "https://); files and local devices come from the config file")
        if control.fleet_info() is None and len(control.list_streams()) >= http.max_streams:
            raise HTTPException(status.HTTP_409_CONFLICT, f"this process runs {http.max_streams} streams, the most "
                                                          "http.max_streams allows; remove one first")
        try:
            control.add_stream(stream)
        except StreamExists:
            raise HTTPException(status.HTTP_409_CONFLICT, f"stream '{stream.id}' already exists") from None
        except (NotAcceptingChanges, RegistryUnavailable) as error:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(error)) from None
        except ValueError as error:
            raise HTTPException(422, str(error)) from None  # the constant's name differs between Starlette versions
        return {"id": stream.id, "url": stream.redacted_url}

    @app.delete("/api/v1/streams/{stream_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["control"],
                dependencies=[Depends(authorise)])
    def remove_stream(stream_id: str) -> Response:
        try:
            control.remove_stream(stream_id)
        except UnknownStream:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no stream '{stream_id}'") from None
        except (NotAcceptingChanges, RegistryUnavailable) as error:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(error)) from None
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    return app


def _guard(app: FastAPI, http: HttpConfig, auth_token: str | None) -> None:
    """Every request passes `access.py`'s rules before any route sees it, and a body that fails validation is
    answered with the key paths `vap validate` would name."""
    own_names = own_host_names(http.host)

    @app.exception_handler(RequestValidationError)
    def invalid_body(_request: Request, error: RequestValidationError) -> JSONResponse:
        """FastAPI's own answer, except that an error about one item of a list (a duplicate zone id) has that
        item in its `loc`, as `vap validate` names it, rather than the list."""
        problems = []
        for problem in error.errors():
            below = problem.get("ctx", {}).get("at", ()) if problem.get("type") == "config_item" else ()
            problems.append({**problem, "loc": [*problem.get("loc", ()), *below]})
        return JSONResponse({"detail": jsonable_encoder(problems)}, status_code=422)

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        headers = request.headers
        refusal = api_refusal(request.url.path, headers.get("host"), headers.get("authorization"), auth_token,
                              own_names, http.allowed_hosts) or body_refusal(
            headers.get("content-length"), "chunked" in headers.get("transfer-encoding", "").lower(),
            http.max_body_bytes)
        if refusal is not None:
            return JSONResponse({"detail": refusal.detail}, status_code=refusal.status, headers=dict(refusal.headers))
        return await call_next(request)


class HttpServer:
    """Uvicorn on its own named thread; `port` is the bound port (useful when 0 was asked for). `option` is how
    errors name the host and port settings (`http.` in a config, `--` on a command line)."""

    def __init__(self, host: str, port: int, app: FastAPI, option: str = "http.") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as error:
            self._socket.close()
            key = f"{option}port"
            if isinstance(error, socket.gaierror):
                key = f"{option}host: not a host name this machine can resolve"
            elif error.errno == errno.EADDRNOTAVAIL:
                key = f"{option}host: no interface of this machine has that address"
            raise RuntimeError(f"cannot listen on {host}:{port} ({key}): {error.strerror}") from None
        self.port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="http" if option == "http." else "dashboard-http",
                                        daemon=True)

    def _serve(self) -> None:
        self._server.run(sockets=[self._socket])

    def start(self, timeout_s: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._server.started:
            raise RuntimeError("the HTTP server did not start")

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._server.should_exit = True
        if self._thread.ident is not None:
            self._thread.join(timeout=timeout_s)
        self._socket.close()
