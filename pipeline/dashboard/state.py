"""What the dashboard shows, built from Kafka records: sans-I/O, so a test feeds it records and a clock.

Each stream has a `StreamView`. A picture from the snapshots topic is shown with the detections of *its own*
frame, found by the `frame_id` header among the stream's recent frame messages. Pictures usually arrive
before their frame's message (their lane has no spool), so a picture waits for its frame for a moment; one
whose frame never comes (the frame was dropped) is shown after `_PICTURE_WAIT_S` without an overlay,
rather than with another frame's boxes. When the results lag behind the pictures (a busy consumer), a few
pictures wait at once, so the newest one to meet its frame is shown rather than none at all.

Views are versioned: the page is sent only the streams whose version changed since it last heard, and a
stream's JSON is built once per version however many pages watch.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import orjson

RECENT_FRAMES = 48
PICTURES_KEPT = 3
LATENCY_POINTS = 60
EVENTS_KEPT = 20
MAX_STREAMS = 1024
MAX_OUTLINE_POINTS = 48
_FPS_WINDOW = 24
_PICTURE_WAIT_S = 2.0

Headers = Iterable[tuple[str, bytes | None]] | None
BrokerState = Literal["connecting", "connected", "unreachable"]


def header(headers: Headers, name: str) -> str | None:
    value: str | None = None
    for key, raw in headers or ():
        if key == name and raw is not None:
            value = raw.decode("utf-8", "replace")
    return value


def _epoch(text: object) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _outline(mask: object) -> list[list[float]] | None:
    """A mask polygon thinned to at most `MAX_OUTLINE_POINTS` points: enough to see a shape in a tile, and a
    page watching 64 cameras is not sent thousands of vertices a second."""
    if not isinstance(mask, dict) or not isinstance(mask.get("polygon"), list):
        return None
    polygon: list[Any] = mask["polygon"]
    step = max(1, math.ceil(len(polygon) / MAX_OUTLINE_POINTS))
    return [[round(float(point[0]), 1), round(float(point[1]), 1)] for point in polygon[::step]]


def overlay(frame: dict[str, Any]) -> dict[str, Any]:
    """What the page draws over a frame's picture: boxes, outlines, labels and track ids, in source pixels."""
    detections = []
    for detection in frame.get("detections") or ():
        box = detection["bbox"]
        detections.append({
            "box": [box["x1"], box["y1"], box["x2"], box["y2"]],
            "label": str(detection.get("label", detection.get("class_id", "?"))),
            "confidence": detection.get("confidence"),
            "track_id": detection.get("track_id"),
            "outline": _outline(detection.get("mask")),
        })
    image = frame.get("image") or {}
    classes = [{"label": entry.get("label"), "confidence": entry.get("confidence")}
               for entry in frame.get("classes") or ()]
    zones = [{"id": zone.get("id"), "kind": zone.get("kind"), "points": zone.get("points"), "count": zone.get("count")}
             for zone in frame.get("zones") or ()]
    return {"frame_id": frame["frame_id"], "width": image.get("width"), "height": image.get("height"),
            "detections": detections, "classes": classes, "zones": zones}


@dataclass
class _Picture:
    seq: int
    frame_id: int
    jpeg: bytes
    received_at: float
    overlay: dict[str, Any] | None = None


@dataclass
class StreamView:
    stream_id: str
    version: int = 0
    worker: str | None = None
    frame_id: int | None = None
    image: dict[str, Any] = field(default_factory=dict)
    received_at: float = 0.0
    latency_ms: float | None = None
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_POINTS))
    captured: deque[float] = field(default_factory=lambda: deque(maxlen=_FPS_WINDOW))
    labels: dict[str, int] = field(default_factory=dict)
    frames: OrderedDict[int, dict[str, Any]] = field(default_factory=OrderedDict)
    latest: dict[str, Any] | None = None
    shown: _Picture | None = None
    waiting: OrderedDict[int, _Picture] = field(default_factory=OrderedDict)
    pictures: deque[_Picture] = field(default_factory=lambda: deque(maxlen=PICTURES_KEPT))
    zones: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))
    cached: tuple[int, dict[str, Any]] | None = None

    def fps(self) -> float | None:
        if len(self.captured) < 2 or self.captured[-1] <= self.captured[0]:
            return None
        return round((len(self.captured) - 1) / (self.captured[-1] - self.captured[0]), 2)


class DashboardState:
    """Every stream seen, the broker's state, and the counts a test or the page can check. Thread-safe: the
    feed thread writes while the web server reads."""

    def __init__(self, stale_after_s: float = 5.0) -> None:
        self.stale_after_s = stale_after_s
        self._lock = threading.Lock()
        self._streams: OrderedDict[str, StreamView] = OrderedDict()
        self._pictures: dict[int, bytes] = {}
        self._next_seq = 1
        self.broker: BrokerState = "connecting"
        self.broker_detail = ""
        self.broker_since = 0.0
        self.broker_version = 0
        self.messages = 0
        self.skipped = 0

    # Writes (the feed thread)

    def set_broker(self, state: BrokerState, detail: str, now: float) -> None:
        with self._lock:
            if (state, detail) != (self.broker, self.broker_detail):
                if state != self.broker:
                    self.broker_since = now
                self.broker, self.broker_detail = state, detail
                self.broker_version += 1

    def frame(self, value: bytes, headers: Headers, now: float) -> None:
        try:
            message = orjson.loads(value)
            stream_id, frame_id = message["stream_id"], int(message["frame_id"])
            latency = message["latency_ms"]["total"]
            captured = _epoch(message.get("captured_at"))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            self.skipped += 1
            return
        with self._lock:
            self.messages += 1
            view = self._view(stream_id)
            worker = header(headers, "worker")
            if view.frame_id is not None and (frame_id < view.frame_id or worker != view.worker):
                view.frames.clear()  # restarted or moved: frame ids start again
                view.waiting.clear()
                view.captured.clear()
            view.worker, view.frame_id, view.received_at = worker, frame_id, now
            view.image = message.get("image") or {}
            view.latency_ms = float(latency)
            view.latencies.append(round(float(latency), 1))
            if captured is not None:
                view.captured.append(captured)
            labels: dict[str, int] = {}
            for detection in message.get("detections") or ():
                label = str(detection.get("label"))
                labels[label] = labels.get(label, 0) + 1
            view.labels = labels
            for zone in message.get("zones") or ():  # counts at this frame, from vap itself: better than events
                entry = view.zones.setdefault(str(zone["id"]), {"id": str(zone["id"]), "kind": zone["kind"],
                                                                "inside": 0, "crossings": 0})
                entry["inside" if zone["kind"] == "zone" else "crossings"] = int(zone["count"])
                entry["from_frames"] = True
            view.frames[frame_id] = message
            while len(view.frames) > RECENT_FRAMES:
                view.frames.popitem(last=False)
            view.latest = message
            picture = view.waiting.pop(frame_id, None)
            if picture is not None:
                self._show(view, picture, message)
            for passed in [waiting for waiting in view.waiting if waiting < frame_id]:
                del view.waiting[passed]  # frames come in order: that frame was never published
            view.version += 1

    def picture(self, key: bytes | None, value: bytes, headers: Headers, now: float) -> None:
        frame_id_text = header(headers, "frame_id")
        if key is None or frame_id_text is None or not frame_id_text.isdigit():
            self.skipped += 1
            return
        with self._lock:
            view = self._view(key.decode("utf-8", "replace"))
            picture = _Picture(self._next_seq, int(frame_id_text), value, now)
            self._next_seq += 1
            if len(view.pictures) == view.pictures.maxlen:
                self._pictures.pop(view.pictures[0].seq, None)
            view.pictures.append(picture)
            self._pictures[picture.seq] = value
            frame = view.frames.get(picture.frame_id)
            if frame is not None:
                self._show(view, picture, frame)
            else:
                view.waiting[picture.frame_id] = picture
                while len(view.waiting) > PICTURES_KEPT:
                    view.waiting.popitem(last=False)
            view.version += 1

    def event(self, value: bytes, now: float) -> None:
        try:
            event = orjson.loads(value)
            stream_id, zone_id, kind = event["stream_id"], str(event["zone_id"]), event["event"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.skipped += 1
            return
        with self._lock:
            view = self._view(stream_id)
            zone = view.zones.setdefault(zone_id, {"id": zone_id, "kind": event.get("zone_kind", "zone"),
                                                   "inside": 0, "crossings": 0})
            if zone.get("from_frames"):
                pass  # the frame messages count it
            elif kind == "enter":
                zone["inside"] += 1
            elif kind == "exit":
                zone["inside"] = max(0, zone["inside"] - 1)
            elif kind == "cross":
                zone["crossings"] += 1
            view.events.appendleft({
                "at": event.get("occurred_at"), "event": kind, "zone_id": zone_id, "label": event.get("label"),
                "track_id": event.get("track_id"), "direction": event.get("direction"),
            })
            view.version += 1

    def tick(self, now: float) -> None:
        """Shows pictures that waited too long for their frame's message; call a few times a second."""
        with self._lock:
            for view in self._streams.values():
                overdue = [picture for picture in view.waiting.values() if now - picture.received_at >= _PICTURE_WAIT_S]
                if overdue:
                    for picture in overdue:
                        del view.waiting[picture.frame_id]
                    self._show(view, overdue[-1], None)
                    view.version += 1

    def _view(self, stream_id: str) -> StreamView:
        view = self._streams.get(stream_id)
        if view is None:
            if len(self._streams) >= MAX_STREAMS:
                oldest = min(self._streams.values(), key=lambda candidate: candidate.received_at)
                self._forget(oldest)
            view = self._streams[stream_id] = StreamView(stream_id)
        return view

    def _forget(self, view: StreamView) -> None:
        for picture in view.pictures:
            self._pictures.pop(picture.seq, None)
        del self._streams[view.stream_id]

    @staticmethod
    def _show(view: StreamView, picture: _Picture, frame: dict[str, Any] | None) -> None:
        """Never goes back to an older picture: one can match its frame after a newer one was shown."""
        if view.shown is not None and view.shown.seq > picture.seq:
            return
        picture.overlay = None if frame is None else overlay(frame)
        view.shown = picture

    # Reads (the web server)

    def picture_bytes(self, seq: int) -> bytes | None:
        with self._lock:
            return self._pictures.get(seq)

    def versions(self) -> dict[str, int]:
        with self._lock:
            return {stream_id: view.version for stream_id, view in self._streams.items()}

    def views(self, stream_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        with self._lock:
            chosen = self._streams.values() if stream_ids is None else (
                self._streams[stream_id] for stream_id in stream_ids if stream_id in self._streams)
            return [self._json(view) for view in chosen]

    def broker_json(self, now: float) -> dict[str, Any]:
        with self._lock:
            return {"state": self.broker, "detail": self.broker_detail,
                    "for_s": round(max(0.0, now - self.broker_since), 1) if self.broker_since else None}

    def summary(self, now: float) -> dict[str, Any]:
        """`GET /api/streams`: the whole state, ages computed now."""
        streams = sorted(self.views(), key=lambda view: view["id"])
        for view in streams:
            view["age_s"] = round(max(0.0, now - view["received_at"]), 2) if view["received_at"] else None
            view["stale"] = view["age_s"] is None or view["age_s"] > self.stale_after_s
        return {"server_time": now, "stale_after_s": self.stale_after_s, "broker": self.broker_json(now),
                "messages": self.messages, "skipped": self.skipped, "streams": streams}

    @staticmethod
    def _json(view: StreamView) -> dict[str, Any]:
        if view.cached is not None and view.cached[0] == view.version:
            return dict(view.cached[1])
        shown = view.shown
        body: dict[str, Any] = {
            "id": view.stream_id, "version": view.version, "worker": view.worker, "frame_id": view.frame_id,
            "image": view.image, "received_at": view.received_at, "fps": view.fps(),
            "latency_ms": view.latency_ms, "latency_history": list(view.latencies), "labels": view.labels,
            "picture": None if shown is None else {
                "url": f"api/pictures/{shown.seq}.jpg", "seq": shown.seq, "frame_id": shown.frame_id,
                "overlay": shown.overlay},
            # Without pictures (no snapshots topic) the page draws the newest frame's detections alone.
            "overlay": overlay(view.latest) if shown is None and view.latest is not None else None,
            "zones": [{key: value for key, value in zone.items() if key != "from_frames"}
                      for zone in sorted(view.zones.values(), key=lambda zone: zone["id"])],
            "events": list(view.events),
        }
        view.cached = (view.version, body)
        return dict(body)
