"""The `vap.frame.v1` message: built from a frame's result, serialised with orjson.

The JSON Schema in `schemas/` is the contract; this module is its only writer.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import orjson

from pipeline.frames import FrameResult

if TYPE_CHECKING:
    from pipeline.analytics.zones import ZoneEvent

SCHEMA_ID = "vap.frame.v1"
EVENT_SCHEMA_ID = "vap.event.v1"
HEADERS: list[tuple[str, bytes]] = [("content-type", b"application/json"), ("schema", SCHEMA_ID.encode())]
EVENT_HEADERS: list[tuple[str, bytes]] = [("content-type", b"application/json"), ("schema", EVENT_SCHEMA_ID.encode())]


def load_schema(schema_id: str = SCHEMA_ID) -> dict[str, Any]:
    text = resources.files("pipeline").joinpath("schemas").joinpath(f"{schema_id}.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def utc_iso(moment: datetime) -> str:
    """RFC 3339 with milliseconds and a Z, the form dashboards parse without surprises."""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _round(value: float, digits: int = 2) -> float:
    return round(float(value), digits)


def _masks(polygons: tuple[npt.NDArray[np.float32] | None, ...], count: int) -> list[dict[str, Any] | None]:
    """Each detection's mask, its polygon rounded to 2 decimals. All of a frame's polygons are rounded in one
    numpy call: one call per polygon took half of a message's time. Each mask is a contiguous slice of the
    result, which orjson writes as it would a polygon of its own."""
    present = [polygon for polygon in polygons[:count] if polygon is not None]
    if not present:
        return [None] * count
    rounded = np.concatenate(present).astype(np.float64).round(2)
    masks: list[dict[str, Any] | None] = []
    start = 0
    for index in range(count):
        polygon = polygons[index] if index < len(polygons) else None
        if polygon is None:
            masks.append(None)
            continue
        end = start + len(polygon)
        masks.append({"polygon": rounded[start:end]})
        start = end
    return masks


def build_message(result: FrameResult, model_name: str, published_at: datetime, total_ms: float) -> dict[str, Any]:
    frame = result.frame
    message: dict[str, Any] = {
        "schema": SCHEMA_ID,
        "stream_id": frame.stream_id,
        "frame_id": frame.frame_id,
        "pts_ms": None if frame.pts_ms is None else _round(frame.pts_ms, 3),
        "captured_at": utc_iso(frame.captured_at),
        "published_at": utc_iso(published_at),
        "image": {"width": frame.width, "height": frame.height},
        "model": {"name": model_name, "task": result.task},
        "latency_ms": {
            "queue": _round(result.queue_ms),
            "inference": _round(result.inference_ms),
            "total": _round(max(0.0, total_ms)),
        },
    }
    if result.zones:
        message["zones"] = [{"id": zone.zone_id, "kind": zone.kind, "points": zone.points, "count": zone.count}
                            for zone in result.zones]
    if result.task == "classify":
        message["classes"] = [
            {"class_id": c.class_id, "label": c.label, "confidence": _round(c.confidence, 4)}
            for c in result.classes
        ]
        return message
    detections = result.detections
    if len(detections) == 0:  # most frames of most cameras: none of the array work below
        message["detections"] = []
        return message
    boxes = detections.boxes_xyxy.astype(np.float64).round(2).tolist()
    confidences = detections.confidences.astype(np.float64).round(4).tolist()
    track_ids = detections.track_ids
    masks = _masks(detections.polygons, len(boxes))
    # A model overflowing in FP16 can give NaN or inf, which JSON writes as null and the schema refuses.
    finite = (np.isfinite(detections.boxes_xyxy).all(axis=1) & np.isfinite(detections.confidences)).tolist()
    # Polygons stay arrays: orjson writes them natively, several times faster than lists of floats.
    message["detections"] = [
        {
            "class_id": class_id,
            "label": result.labels.get(class_id, str(class_id)),
            "confidence": confidence,
            "bbox": {"x1": box[0], "y1": box[1], "x2": box[2], "y2": box[3]},
            "track_id": track_ids[index] if index < len(track_ids) else None,
            "mask": masks[index],
        }
        for index, (class_id, confidence, box) in enumerate(
            zip(detections.class_ids.tolist(), confidences, boxes, strict=True))
        if finite[index]
    ]
    return message


def detections_by_label(message: dict[str, Any]) -> list[tuple[str, int]]:
    """How many of each label a frame's message reports (`vap_detections_total`)."""
    return list(Counter(detection["label"] for detection in message.get("detections", ())).items())


def encode(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message, option=orjson.OPT_SERIALIZE_NUMPY)


def build_event(event: ZoneEvent, published_at: datetime) -> dict[str, Any]:
    return {
        "schema": EVENT_SCHEMA_ID,
        "stream_id": event.stream_id,
        "event": event.event,
        "zone_id": event.zone_id,
        "zone_kind": event.zone_kind,
        "track_id": event.track_id,
        "class_id": event.class_id,
        "label": event.label,
        "frame_id": event.frame_id,
        "pts_ms": None if event.pts_ms is None else _round(event.pts_ms, 3),
        "occurred_at": utc_iso(event.occurred_at),
        "published_at": utc_iso(published_at),
        "position": {"x": _round(event.position[0]), "y": _round(event.position[1])},
        "direction": event.direction,
        "dwell_s": event.dwell_s,
    }
