"""The dashboard's HTTP side: the page, its assets, `GET /api/streams`, pictures, and `GET /api/updates`, a
server-sent event stream that pushes what changed every `tick_s`.

Each watching page gets only the streams whose version changed since its last update, computed when the
page is ready for more: a slow page is never queued for, it simply gets the newest state when it reads
again. Every URL the page uses is relative, so the dashboard works behind a reverse proxy under a path prefix.

With a token, every route but `/healthz` needs it: as a bearer header (scripts), or as the cookie that the
page sets when opened once as `?token=...` (a browser cannot add headers to images or event streams).
"""

from __future__ import annotations

import asyncio
import hmac
import threading
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, HTTPException, Request, Response, status
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse

from pipeline import __version__
from pipeline.dashboard.state import DashboardState

COOKIE = "vap_dashboard_token"
STATIC_DIR = Path(str(resources.files("pipeline.dashboard").joinpath("static")))
_ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}
_LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>vap dashboard: token</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: sans-serif; background: #111; color: #f2f2f2; padding: 2em">
<h1>vap dashboard</h1><p>This dashboard needs its access token.</p>
<form method="get" action="./"><label for="token">Token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required>
<button type="submit">Open</button></form></body></html>"""


def build_dashboard_app(state: DashboardState, token: str | None, tick_s: float = 0.5,
                        alive: Callable[[], bool] = lambda: True,
                        closing: threading.Event | None = None) -> FastAPI:
    app = FastAPI(title="vap dashboard", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    closing = closing or threading.Event()

    def authorised(request: Request) -> bool:
        if token is None:
            return True
        supplied = request.headers.get("authorization", "").removeprefix("Bearer ")
        supplied = supplied or request.cookies.get(COOKIE, "")
        return hmac.compare_digest(supplied.encode(), token.encode())

    def require(request: Request) -> None:
        if not authorised(request):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong dashboard token",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> JSONResponse:
        ok = alive()
        return JSONResponse({"ok": ok}, status_code=200 if ok else 503)

    @app.get("/", include_in_schema=False)
    def index(request: Request) -> Response:
        offered = request.query_params.get("token")
        if token is not None and offered is not None:
            if not hmac.compare_digest(offered.encode(), token.encode()):
                return HTMLResponse(_LOGIN_PAGE, status_code=status.HTTP_401_UNAUTHORIZED)
            redirect = RedirectResponse("./", status_code=status.HTTP_303_SEE_OTHER)
            redirect.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return redirect
        if not authorised(request):
            return HTMLResponse(_LOGIN_PAGE, status_code=status.HTTP_401_UNAUTHORIZED)
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    def asset(name: str, request: Request) -> Response:
        require(request)
        if name not in _ASSETS:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such asset")
        return FileResponse(STATIC_DIR / name, media_type=_ASSETS[name], headers={"Cache-Control": "no-cache"})

    @app.get("/api/streams")
    def streams(request: Request) -> Response:
        require(request)
        return Response(orjson.dumps(state.summary(time.time())), media_type="application/json")

    @app.get("/api/pictures/{seq}.jpg")
    async def picture(seq: int, request: Request) -> Response:  # bytes at hand: no worker thread needed
        require(request)
        jpeg = state.picture_bytes(seq)
        if jpeg is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "that picture has been replaced by newer ones")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"})

    @app.get("/api/updates")
    async def updates(request: Request) -> StreamingResponse:
        require(request)
        return StreamingResponse(_updates(state, request, tick_s, closing), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


async def _updates(state: DashboardState, request: Request, tick_s: float,
                   closing: threading.Event) -> AsyncIterator[bytes]:
    """The first update has every stream (`full`), the next ones what changed; one at least every tick, so a
    page knows its connection lives and ages its tiles against the server's clock."""
    seen: dict[str, int] = {}
    pictures_sent: dict[str, str] = {}
    full = True
    while not closing.is_set() and not await request.is_disconnected():
        versions = state.versions()
        changed = [stream_id for stream_id, version in versions.items() if seen.get(stream_id) != version]
        removed = [stream_id for stream_id in seen if stream_id not in versions]
        seen = versions
        now = time.time()
        views = without_repeated_overlays(state.views(changed), pictures_sent)
        update = {"server_time": now, "stale_after_s": state.stale_after_s, "broker": state.broker_json(now),
                  "full": full, "streams": views, "removed": removed}
        full = False
        yield b"event: update\ndata: " + orjson.dumps(update) + b"\n\n"
        await asyncio.sleep(tick_s)


def without_repeated_overlays(views: list[dict[str, Any]], pictures_sent: dict[str, str]) -> list[dict[str, Any]]:
    """A picture's overlay (its outlines are most of an update's bytes) goes to a page once: later updates of
    the stream that show the same picture leave it out, and the page keeps the one it has."""
    for view in views:
        picture = view.get("picture")
        if picture is None:
            continue
        if pictures_sent.get(view["id"]) == picture["url"]:
            view["picture"] = {key: value for key, value in picture.items() if key != "overlay"}
        else:
            pictures_sent[view["id"]] = picture["url"]
    return views
