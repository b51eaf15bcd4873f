"""The dashboard's state, fed records by hand: which detections go with which picture, stale streams, zone
counts from events, bounds, and what is skipped."""

from __future__ import annotations

from typing import Any

import orjson

from pipeline.dashboard.state import MAX_OUTLINE_POINTS, PICTURES_KEPT, DashboardState


def frame_message(stream_id: str, frame_id: int, boxes: list[tuple[float, float, float, float]],
                  latency_ms: float = 40.0, captured: str = "2026-12-07T10:00:00.000Z",
                  polygon: list[list[float]] | None = None) -> bytes:
    detections: list[dict[str, Any]] = [
        {"class_id": 0, "label": "circle", "confidence": 0.9, "track_id": index + 1,
         "bbox": {"x1": box[0], "y1": box[1], "x2": box[2], "y2": box[3]},
         "mask": None if polygon is None else {"polygon": polygon}}
        for index, box in enumerate(boxes)
    ]
    return orjson.dumps({
        "schema": "vap.frame.v1", "stream_id": stream_id, "frame_id": frame_id, "pts_ms": None,
        "captured_at": captured, "published_at": captured, "image": {"width": 320, "height": 192},
        "model": {"name": "m", "task": "segment"}, "latency_ms": {"queue": 1.0, "inference": 10.0, "total": latency_ms},
        "detections": detections,
    })


def picture_headers(frame_id: int) -> list[tuple[str, bytes]]:
    return [("frame_id", str(frame_id).encode()), ("content-type", b"image/jpeg")]


def only_view(state: DashboardState, now: float) -> dict[str, Any]:
    streams: list[dict[str, Any]] = state.summary(now)["streams"]
    assert len(streams) == 1
    return streams[0]


def test_a_picture_is_drawn_with_its_own_frames_detections_whichever_arrives_first() -> None:
    state = DashboardState()
    state.frame(frame_message("cam", 10, [(1, 2, 3, 4)]), None, now=100.0)
    state.frame(frame_message("cam", 11, [(50, 60, 70, 80)]), None, now=100.1)
    state.picture(b"cam", b"jpeg-10", picture_headers(10), now=100.2)  # after its frame
    picture = only_view(state, 100.2)["picture"]
    assert picture["frame_id"] == 10
    assert picture["overlay"]["detections"][0]["box"] == [1, 2, 3, 4]
    assert state.picture_bytes(int(picture["url"].split("/")[-1].removesuffix(".jpg"))) == b"jpeg-10"

    state.picture(b"cam", b"jpeg-12", picture_headers(12), now=100.3)  # before its frame: waits
    assert only_view(state, 100.3)["picture"]["frame_id"] == 10
    state.frame(frame_message("cam", 12, [(5, 6, 7, 8)]), None, now=100.4)
    picture = only_view(state, 100.4)["picture"]
    assert (picture["frame_id"], picture["overlay"]["detections"][0]["box"]) == (12, [5, 6, 7, 8])


def test_a_picture_whose_frame_never_comes_is_shown_after_a_while_without_anyone_elses_boxes() -> None:
    state = DashboardState()
    state.frame(frame_message("cam", 1, [(1, 2, 3, 4)]), None, now=10.0)
    state.picture(b"cam", b"jpeg-5", picture_headers(5), now=10.0)
    state.tick(11.0)
    assert only_view(state, 11.0)["picture"] is None
    state.tick(12.5)
    picture = only_view(state, 12.5)["picture"]
    assert picture["frame_id"] == 5 and picture["overlay"] is None


def test_a_restarted_stream_never_matches_a_picture_with_the_old_runs_frame() -> None:
    state = DashboardState()
    state.frame(frame_message("cam", 7, [(1, 1, 2, 2)]), None, now=1.0)
    state.frame(frame_message("cam", 3, [(9, 9, 10, 10)]), [("worker", b"b")], now=2.0)  # moved to worker b
    state.picture(b"cam", b"jpeg", picture_headers(7), now=2.1)
    assert only_view(state, 2.1)["picture"] is None


def test_without_pictures_the_tile_gets_the_newest_frames_detections() -> None:
    state = DashboardState()
    state.frame(frame_message("cam", 1, [(1, 2, 3, 4)]), None, now=1.0)
    state.frame(frame_message("cam", 2, [(10, 20, 30, 40), (0, 0, 5, 5)]), None, now=1.1)
    view = only_view(state, 1.1)
    assert view["picture"] is None
    assert view["overlay"]["frame_id"] == 2 and len(view["overlay"]["detections"]) == 2
    assert view["labels"] == {"circle": 2}


def test_age_stale_fps_and_latency() -> None:
    state = DashboardState(stale_after_s=5.0)
    for index in range(5):
        state.frame(frame_message("cam", index, [], latency_ms=30.0 + index,
                                  captured=f"2026-12-07T10:00:00.{index * 100:03d}Z"), None, now=50.0 + index * 0.1)
    view = only_view(state, 50.5)
    assert view["fps"] == 10.0
    assert view["latency_ms"] == 34.0 and view["latency_history"] == [30.0, 31.0, 32.0, 33.0, 34.0]
    assert not view["stale"] and view["age_s"] == 0.1
    view = only_view(state, 60.0)
    assert view["stale"] and view["age_s"] == 9.6


def test_zone_counts_and_recent_events_come_from_the_events_topic() -> None:
    state = DashboardState()

    def event(kind: str, zone: str, zone_kind: str = "zone") -> bytes:
        return orjson.dumps({"schema": "vap.event.v1", "stream_id": "cam", "event": kind, "zone_id": zone,
                             "zone_kind": zone_kind, "track_id": 1, "label": "circle", "occurred_at": "x",
                             "direction": "east" if kind == "cross" else None})

    for kind in ("enter", "enter", "exit", "exit", "exit"):
        state.event(event(kind, "door"), now=1.0)
    state.event(event("enter", "door"), now=1.0)
    state.event(event("cross", "kerb", "line"), now=1.0)
    view = only_view(state, 1.0)
    assert view["zones"] == [{"id": "door", "kind": "zone", "inside": 1, "crossings": 0},
                             {"id": "kerb", "kind": "line", "inside": 0, "crossings": 1}]
    assert view["events"][0]["event"] == "cross" and len(view["events"]) == 7


def test_bounds_pictures_and_outlines() -> None:
    state = DashboardState()
    square = [[float(x), 0.0] for x in range(500)]
    state.frame(frame_message("cam", 0, [(0, 0, 1, 1)], polygon=square), None, now=1.0)
    for frame_id in range(10):
        state.picture(b"cam", f"jpeg-{frame_id}".encode(), picture_headers(frame_id), now=1.0)
    held = [seq for seq in range(1, 11) if state.picture_bytes(seq) is not None]
    assert held == list(range(11 - PICTURES_KEPT, 11))
    outline = only_view(state, 1.0)["picture"]["overlay"]["detections"][0]["outline"]
    assert 2 < len(outline) <= MAX_OUTLINE_POINTS


def test_records_that_are_not_vap_messages_are_counted_and_skipped() -> None:
    state = DashboardState()
    state.frame(b"not json", None, now=1.0)
    state.frame(b'{"schema": "vap.frame.v1"}', None, now=1.0)
    state.picture(None, b"jpeg", picture_headers(1), now=1.0)
    state.picture(b"cam", b"jpeg", [("content-type", b"image/jpeg")], now=1.0)
    state.event(b"[]", now=1.0)
    assert state.skipped == 5
    assert state.summary(1.0)["streams"] == []


def test_only_changed_streams_have_new_versions() -> None:
    state = DashboardState()
    state.frame(frame_message("a", 0, []), None, now=1.0)
    state.frame(frame_message("b", 0, []), None, now=1.0)
    before = state.versions()
    state.frame(frame_message("b", 1, []), None, now=1.1)
    after = state.versions()
    assert after["a"] == before["a"] and after["b"] > before["b"]


def test_a_pictures_overlay_is_pushed_to_a_page_once() -> None:
    from pipeline.dashboard.web import without_repeated_overlays

    state = DashboardState()
    state.frame(frame_message("cam", 0, [(1, 2, 3, 4)]), None, now=1.0)
    state.picture(b"cam", b"jpeg", picture_headers(0), now=1.0)
    sent: dict[str, str] = {}
    (first,) = without_repeated_overlays(state.views(), sent)
    state.frame(frame_message("cam", 1, []), None, now=1.1)
    (second,) = without_repeated_overlays(state.views(), sent)
    assert first["picture"]["overlay"]["detections"] and "overlay" not in second["picture"]
    assert second["picture"]["url"] == first["picture"]["url"]
    assert state.views()[0]["picture"]["overlay"] is not None  # the state itself keeps it
    (other_page,) = without_repeated_overlays(state.views(), {})
    assert other_page["picture"]["overlay"] is not None


def test_when_results_lag_behind_the_pictures_each_picture_still_meets_its_own_frame() -> None:
    state = DashboardState()
    for frame_id in (10, 20, 30):
        state.picture(b"cam", f"jpeg-{frame_id}".encode(), picture_headers(frame_id), now=1.0)
    shown = []
    for frame_id in range(31):
        state.frame(frame_message("cam", frame_id, [(frame_id, 0, frame_id + 5, 5)]), None, now=1.5)
        picture = only_view(state, 1.5)["picture"]
        shown.append(None if picture is None else (picture["frame_id"], picture["overlay"]["detections"][0]["box"][0]))
    assert shown[9] is None and shown[10] == (10, 10) and shown[25] == (20, 20) and shown[30] == (30, 30)


def test_zone_counts_from_frame_messages_win_over_counting_events_and_are_drawn_with_their_frame() -> None:
    state = DashboardState()
    message = orjson.loads(frame_message("cam", 3, [(1, 2, 3, 4)]))
    message["zones"] = [{"id": "door", "kind": "zone", "points": [[0, 0], [10, 0], [10, 10]], "count": 2},
                        {"id": "kerb", "kind": "line", "points": [[0, 5], [10, 5]], "count": 7}]
    state.event(orjson.dumps({"stream_id": "cam", "event": "enter", "zone_id": "door", "zone_kind": "zone"}), now=1.0)
    state.frame(orjson.dumps(message), None, now=1.0)
    state.event(orjson.dumps({"stream_id": "cam", "event": "enter", "zone_id": "door", "zone_kind": "zone"}), now=1.1)
    state.picture(b"cam", b"jpeg", picture_headers(3), now=1.1)
    view = only_view(state, 1.1)
    assert view["zones"] == [{"id": "door", "kind": "zone", "inside": 2, "crossings": 0},
                             {"id": "kerb", "kind": "line", "inside": 0, "crossings": 7}]
    assert [zone["count"] for zone in view["picture"]["overlay"]["zones"]] == [2, 7]
