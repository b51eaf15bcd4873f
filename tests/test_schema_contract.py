"""The message contract: a schema change without a version bump fails here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.client import GapTracker, parse_message
from pipeline.publishing.messages import SCHEMA_ID, build_message, encode, load_schema
from tests.fakes import make_frame, make_result

RELEASED = Path(__file__).parent / "data" / f"{SCHEMA_ID}.released.json"


def required_fields(schema: dict[str, Any]) -> dict[str, Any]:
    """Every required property path with its declared type, recursively, as v1 promised them."""
    found: dict[str, Any] = {}

    def walk(node: dict[str, Any], path: str) -> None:
        node = resolve(schema, node)
        for name in node.get("required", []):
            child = resolve(schema, node.get("properties", {}).get(name, {}))
            found[f"{path}{name}"] = child.get("type", child.get("const", child.get("enum", child.get("oneOf"))))
            walk(child, f"{path}{name}.")
        items = node.get("items")
        if isinstance(items, dict):
            walk(items, f"{path}[].")

    walk(schema, "")
    return found


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    reference = node.get("$ref")
    if reference is None:
        return node
    target: Any = schema
    for part in reference.removeprefix("#/").split("/"):
        target = target[part]
    return dict(target)


def test_shipped_schema_keeps_every_promise_of_the_released_version() -> None:
    released, current = json.loads(RELEASED.read_text()), load_schema()
    assert current["title"] == released["title"] == SCHEMA_ID, "a new version needs a new schema file and id"
    assert required_fields(current) == required_fields(released), (
        "required fields or their types changed within v1: publish vap.frame.v2 instead (docs/message-schema.md)"
    )
    for name, definition in released["properties"].items():
        assert name in current["properties"], f"field '{name}' removed within v1"
        assert current["properties"][name].get("type") == definition.get("type"), f"type of '{name}' changed"


def test_required_fields_catches_a_changed_type() -> None:
    released = json.loads(RELEASED.read_text())
    changed = json.loads(RELEASED.read_text())
    changed["properties"]["frame_id"]["type"] = "string"
    assert required_fields(changed) != required_fields(released)


def test_typed_reader_parses_a_real_message_and_reports_gaps() -> None:
    message = parse_message(encode(build_message(make_result(make_frame("cam-1", 7)), "m", make_frame("x", 0)
                                                 .captured_at, 12.5)))
    assert (message.stream_id, message.frame_id, message.model.name) == ("cam-1", 7, "m")
    assert message.latency_ms.total == 12.5 and message.detections == []
    gaps = GapTracker()
    assert [gaps.observe("a", i) for i in (0, 1, 4, 5)] == [0, 0, 2, 0]
    assert gaps.observe("b", 10) == 0 and gaps.observe("a", 0) == 0


def test_detections_with_nan_or_inf_are_left_out_so_the_message_stays_valid() -> None:
    from datetime import datetime, timezone

    import jsonschema
    import numpy as np

    from pipeline.frames import Detections, FrameResult

    detections = Detections(
        boxes_xyxy=np.array([[1, 2, 3, 4], [np.inf, 2, 3, 4], [5, 6, 7, 8]], np.float32),
        confidences=np.array([0.5, 0.6, np.nan], np.float32),
        class_ids=np.array([0, 1, 2], np.int64),
    )
    result = FrameResult(frame=make_frame("cam", 0), task="detect", detections=detections, labels={0: "a"})
    message = json.loads(encode(build_message(result, "m", datetime.now(timezone.utc), 1.0)))
    jsonschema.validate(message, load_schema())
    assert [d["class_id"] for d in message["detections"]] == [0]


def test_the_schema_takes_real_messages_of_each_task_and_refuses_mixed_or_malformed_ones() -> None:
    from datetime import datetime, timezone

    import jsonschema
    import numpy as np
    import pytest

    from pipeline.frames import Classification, Detections, FrameResult

    def message(task: str, polygons: tuple[Any, ...] = ()) -> dict[str, Any]:
        detections = Detections(np.array([[1, 2, 3, 4]], np.float32), np.array([0.5], np.float32),
                                np.array([0], np.int64), polygons)
        result = FrameResult(frame=make_frame("cam", 0), task=task, detections=detections, labels={0: "a"},
                             classes=(Classification(0, "a", 0.9),))
        built: dict[str, Any] = json.loads(encode(build_message(result, "m", datetime.now(timezone.utc), 1.0)))
        return built

    schema = load_schema()
    segment = message("segment", (np.array([[1, 2], [3, 2], [3, 4]], np.float32),))
    detect, classify = message("detect"), message("classify")
    empty = json.loads(encode(build_message(FrameResult(frame=make_frame("cam", 1), task="segment",
                                                        detections=Detections.empty(), labels={0: "a"}),
                                            "m", datetime.now(timezone.utc), 1.0)))
    for valid in (segment, detect, classify, message("segment", (np.zeros((0, 2), np.float32),)), empty):
        jsonschema.validate(valid, schema)
    assert "classes" in classify and "detections" not in classify
    assert empty["detections"] == [] and empty.keys() == segment.keys(), "a frame with nothing found has it all"

    invalid = [
        {**classify, "detections": []},
        {key: value for key, value in classify.items() if key != "classes"},
        {**detect, "classes": classify["classes"]},
        {key: value for key, value in detect.items() if key != "detections"},
        {**detect, "detections": segment["detections"]},
        {**detect, "captured_at": "2026-11-25T03:21:00+01:00"},
        {**detect, "published_at": "2026-11-25 03:21:00.123"},
    ]
    for broken in invalid:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


def test_each_mask_is_its_own_polygon_rounded_whichever_detections_have_one() -> None:
    """The polygons of a frame are rounded together; each detection must still get exactly its own."""
    from datetime import datetime, timezone

    import jsonschema
    import numpy as np

    from pipeline.frames import Detections, FrameResult

    rng = np.random.default_rng(7)
    polygons = (rng.random((5, 2), np.float32) * 300, None, rng.random((3, 2), np.float32) * 300,
                rng.random((4, 2), np.float32) * 300)
    boxes = rng.random((6, 4), np.float32) * 300
    boxes[3, 0] = np.nan  # left out, with its polygon
    detections = Detections(boxes_xyxy=boxes, confidences=np.full(6, 0.5, np.float32),
                            class_ids=np.zeros(6, np.int64), polygons=polygons)  # the last two have none
    result = FrameResult(frame=make_frame("cam", 0), task="segment", detections=detections, labels={0: "a"})
    message = json.loads(encode(build_message(result, "m", datetime.now(timezone.utc), 1.0)))
    jsonschema.validate(message, load_schema())

    def own(polygon: Any) -> Any:
        return None if polygon is None else {"polygon": np.round(polygon.astype(np.float64), 2).tolist()}

    expected = [own(polygons[0]), None, own(polygons[2]), None, None]
    assert [detection["mask"] for detection in message["detections"]] == expected
    assert [detection["bbox"]["x1"] for detection in message["detections"]] == [
        round(float(boxes[index, 0]), 2) for index in (0, 1, 2, 4, 5)]
