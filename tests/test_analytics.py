"""Zone and line analytics on scripted tracks: exact events for known trajectories."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from pipeline.analytics.zones import StreamAnalytics, ZoneEvent, crosses_segment, point_in_polygon
from pipeline.config import AnalyticsConfig
from pipeline.frames import Detections, FrameResult
from tests.fakes import make_frame

LABELS = {0: "circle", 1: "square", 2: "triangle"}


Box = tuple[float, float, float, float, int]


def analytics_for(config: dict[str, Any]) -> StreamAnalytics:
    return StreamAnalytics("cam", AnalyticsConfig.model_validate(config), "bytetrack", LABELS)


def run(config: dict[str, Any], boxes_per_frame: list[list[Box]],
        fps: float = 10.0) -> list[ZoneEvent]:
    return feed(analytics_for(config), boxes_per_frame, [i * 1000 / fps for i in range(len(boxes_per_frame))])


def feed(analytics: StreamAnalytics, boxes_per_frame: Sequence[Sequence[Box]], pts_ms: Sequence[float | None],
         fps: float = 10.0) -> list[ZoneEvent]:
    """Frames read in real time from a reader whose monotonic clock stands at an uptime of 1000 s, whatever
    media time (`pts_ms`) the source gives them."""
    events: list[ZoneEvent] = []
    for frame_id, (boxes, pts) in enumerate(zip(boxes_per_frame, pts_ms, strict=True)):
        frame = replace(make_frame("cam", frame_id, 320, 240), pts_ms=pts, captured_monotonic=1000 + frame_id / fps)
        detections = Detections(
            boxes_xyxy=np.array([b[:4] for b in boxes], np.float32).reshape(-1, 4),
            confidences=np.full(len(boxes), 0.9, np.float32),
            class_ids=np.array([b[4] for b in boxes], np.int64),
        )
        _, new = analytics.process(FrameResult(frame=frame, task="detect", detections=detections, labels=LABELS))
        events.extend(new)
    return events


def moving_right(class_id: int, y: float, frames: int, start_x: float = 10, step: float = 8) -> list[Box]:
    return [(start_x + i * step, y, start_x + i * step + 20, y + 20, class_id) for i in range(frames)]


def summary(events: list[ZoneEvent]) -> list[tuple[str, str, str | None]]:
    return [(e.event, e.zone_id, e.direction) for e in events]


def test_geometry_primitives() -> None:
    square = [(0.0, 0.0), (10.0, 0.0), (10.0, 10.0), (0.0, 10.0)]
    assert point_in_polygon((5, 5), square) and not point_in_polygon((15, 5), square)
    assert crosses_segment((0, 5), (10, 5), (5, 0), (5, 10)) == -1
    assert crosses_segment((10, 5), (0, 5), (5, 0), (5, 10)) == 1
    assert crosses_segment((0, 20), (10, 20), (5, 0), (5, 10)) == 0, "passing beyond the segment's end"


def test_an_object_crossing_a_zone_and_a_line_gives_enter_cross_exit_in_order() -> None:
    config = {"zones": [{"id": "middle", "polygon": [[100, 0], [200, 0], [200, 240], [100, 240]]}],
              "lines": [{"id": "gate", "start": [150, 240], "end": [150, 0], "directions": ["east", "west"]}]}
    track = moving_right(0, 100, frames=36)
    events = run(config, [[box] for box in track])
    assert summary(events) == [("enter", "middle", None), ("cross", "gate", "east"), ("exit", "middle", None)]
    assert len({e.track_id for e in events}) == 1 and events[0].label == "circle"
    back = run(config, [[box] for box in reversed(track)])
    assert summary(back) == [("enter", "middle", None), ("cross", "gate", "west"), ("exit", "middle", None)]


def test_dwell_fires_once_after_the_threshold_in_media_time() -> None:
    config = {"zones": [{"id": "bay", "polygon": [[0, 0], [320, 0], [320, 240], [0, 240]], "dwell_s": 2.0}]}
    events = run(config, [[(100, 100, 120, 120, 1)]] * 40)
    assert summary(events) == [("enter", "bay", None), ("dwell", "bay", None)]
    assert events[1].dwell_s is not None and 2.0 <= events[1].dwell_s < 2.2


def test_class_filters_and_normalized_zones() -> None:
    config = {"normalized": True, "zones": [{"id": "left-half", "polygon": [[0, 0], [0.5, 0], [0.5, 1], [0, 1]],
                                             "classes": ["square"]}]}
    frames = [[a, b] for a, b in zip(moving_right(0, 40, 10, start_x=20, step=2),
                                     moving_right(1, 160, 10, start_x=20, step=2), strict=True)]
    events = run(config, frames)
    assert summary(events) == [("enter", "left-half", None)]
    assert events[0].label == "square"


def test_a_track_that_vanishes_inside_a_zone_exits_after_expiry() -> None:
    config = {"zones": [{"id": "all", "polygon": [[0, 0], [320, 0], [320, 240], [0, 240]]}]}
    frames: list[list[Box]] = [[(50.0, 50.0, 70.0, 70.0, 2)]] * 5 + [[]] * 40
    assert summary(run(config, frames)) == [("enter", "all", None), ("exit", "all", None)]


def test_a_track_is_labelled_by_its_most_frequent_class_not_its_first() -> None:
    config = {"zones": [{"id": "right", "polygon": [[160, 0], [320, 0], [320, 240], [160, 240]]}]}
    boxes = moving_right(1, 100, frames=25, start_x=10, step=8)
    first: Box = (*boxes[0][:4], 0)
    frames = [[first], *([box] for box in boxes[1:])]
    events = run(config, frames)
    assert [(e.event, e.label) for e in events] == [("enter", "square")]


FULL_FRAME = [[0, 0], [320, 0], [320, 240], [0, 240]]


def test_a_track_last_seen_late_in_a_looping_file_still_exits_when_media_time_restarts() -> None:
    analytics = analytics_for({"zones": [{"id": "all", "polygon": FULL_FRAME}]})
    loops = 6
    frames: list[list[Box]] = [[(50.0, 50.0, 70.0, 70.0, 2)]] * 50 + [[]] * (50 * loops)
    events = feed(analytics, frames, [i * 100.0 for i in range(50)] * (1 + loops))
    assert summary(events) == [("enter", "all", None), ("exit", "all", None)]
    assert analytics.occupancy() == {}


def test_dwell_fires_when_a_live_streams_first_frame_has_no_media_time() -> None:
    analytics = analytics_for({"zones": [{"id": "bay", "polygon": FULL_FRAME, "dwell_s": 2.0}]})
    pts: list[float | None] = [None, *(i * 100.0 for i in range(1, 40))]
    events = feed(analytics, [[(100, 100, 120, 120, 1)]] * 40, pts)
    assert summary(events) == [("enter", "bay", None), ("dwell", "bay", None)]
    assert events[1].dwell_s is not None and 2.0 <= events[1].dwell_s < 2.2


@pytest.mark.parametrize(("section", "classes", "key_path"), [
    ("zones", ["squre"], "analytics.zones[0].classes"),
    ("zones", ["square", 7], "analytics.zones[0].classes"),
    ("lines", [3], "analytics.lines[0].classes"),
], ids=["misspelt-zone-label", "unknown-zone-id", "unknown-line-id"])
def test_a_class_the_model_does_not_have_is_a_startup_error_naming_the_key_and_the_known_classes(
        section: str, classes: list[int | str], key_path: str) -> None:
    entry: dict[str, Any] = ({"id": "z", "polygon": FULL_FRAME} if section == "zones"
                             else {"id": "l", "start": [0, 0], "end": [10, 10]})
    with pytest.raises(ValueError, match=re.escape(key_path)) as raised:
        analytics_for({section: [{**entry, "classes": classes}]})
    assert "stream cam" in str(raised.value)
    assert all(label in str(raised.value) for label in LABELS.values())


def box_at(cx: float, bottom: float, class_id: int = 0) -> Box:
    """A 60 px box whose bottom-centre anchor is (cx, bottom): large enough that the moves below keep the
    tracker on one track."""
    return (cx - 30, bottom - 60, cx + 30, bottom, class_id)


def test_an_object_cut_by_the_frames_bottom_edge_stays_in_a_zone_and_crosses_a_line_there() -> None:
    config = {"normalized": True,
              "zones": [{"id": "forecourt", "polygon": [[0, 0.5], [1, 0.5], [1, 1], [0, 1]]}],
              "lines": [{"id": "entrance", "start": [0.5, 1.0], "end": [0.5, 0.6]}]}
    analytics = analytics_for(config)
    towards_camera = [[box_at(140, y)] for y in (200, 220, 240, 240)]
    along_the_edge = [[box_at(x, 240)] for x in (150, 170)]
    events = feed(analytics, towards_camera + along_the_edge, [i * 100.0 for i in range(6)])
    assert summary(events) == [("enter", "forecourt", None), ("cross", "entrance", "in")]
    assert analytics.occupancy() == {("forecourt", "circle"): 1}


def test_a_move_that_lands_on_a_line_counts_once_and_a_wobble_across_it_not_at_all() -> None:
    config = {"lines": [{"id": "gate", "start": [160, 240], "end": [160, 0]}]}
    assert len(run(config, [[box_at(x, 100)] for x in (150, 160, 170)])) == 1
    wobble = [150, 158, 162, 158, 162, 158, 162]
    assert run(config, [[box_at(x, 100)] for x in wobble]) == []


def test_an_anchor_jittering_on_a_zone_edge_enters_once() -> None:
    config = {"zones": [{"id": "left", "polygon": [[0, 0], [200, 0], [200, 240], [0, 240]]}]}
    events = run(config, [[box_at(x, 100)] for x in (180, 190, 199, 201, 199, 201, 199, 201)])
    assert summary(events) == [("enter", "left", None)]


def test_a_track_inside_a_class_filtered_zone_still_exits_when_its_class_changes() -> None:
    config = {"zones": [{"id": "z", "polygon": [[0, 0], [200, 0], [200, 240], [0, 240]], "classes": ["circle"]}]}
    analytics = analytics_for(config)
    leaving = [[box_at(x, 100, 1)] for x in (180, 200, 220, 240)]
    frames = [[box_at(150, 100, 0)]] * 2 + [[box_at(160, 100, 1)]] * 3 + leaving
    events = feed(analytics, frames, [i * 100.0 for i in range(len(frames))])
    assert summary(events) == [("enter", "z", None), ("exit", "z", None)]
    assert analytics.occupancy() == {}


def test_at_a_low_frame_rate_a_track_the_tracker_keeps_through_an_occlusion_does_not_exit_and_enter_again() -> None:
    config = {"zones": [{"id": "all", "polygon": [[0, 0], [320, 0], [320, 240], [0, 240]]}]}
    frames: list[list[Box]] = [[box_at(100, 100)]] * 5 + [[]] * 17 + [[box_at(100, 100)]] * 3
    events = feed(analytics_for(config), frames, [i * 200.0 for i in range(len(frames))], fps=5.0)
    assert summary(events) == [("enter", "all", None)], "3.4 s unseen at 5 fps is within the tracker's 30 frames"


def test_a_crossing_is_judged_on_the_path_taken_within_the_band_not_a_straight_line_from_the_last_side() -> None:
    config = {"lines": [{"id": "short", "start": [150, 0], "end": [150, 100]}]}
    along_then_across = [(140, 180), (145, 160), (149, 140), (149, 120), (149, 100), (149, 80), (149, 60), (160, 60)]
    assert len(run(config, [[box_at(x, y)] for x, y in along_then_across])) == 1, "it crossed at y=60"
    past_the_end = [(140, 80), (145, 90), (149, 110), (149, 130), (155, 100), (160, 100)]
    assert run(config, [[box_at(x, y)] for x, y in past_the_end]) == [], "it crossed below the segment's end"


def test_a_long_stay_in_a_lines_band_still_decides_the_crossing_by_where_it_met_the_line() -> None:
    from pipeline.analytics.zones import StreamAnalytics, _TrackState

    start, end, band = (0.0, 0.0), (100.0, 0.0), 5.0
    state = _TrackState(0.0, (50.0, -10.0), LABELS)

    def walk(points: list[tuple[float, float]]) -> list[int]:
        crossings = []
        for point in points:
            state.anchor = point
            crossings.append(StreamAnalytics._update_line("l", start, end, state, band))
        return [c for c in crossings if c]

    along = [(50.0 + 10 * i, 1.0) for i in range(1, 71)]
    crossed_then_along = [(50.0, -10.0), (50.0, 1.0), *along, (750.0, 10.0)]
    assert walk(crossed_then_along) == [1], "it crossed at x=50, inside the segment, before 70 steps in the band"
    state.line_sides.clear()
    back = [(150.0 - 0.5 * i, 1.0) for i in range(1, 201)]
    outside_then_back = [(150.0, -10.0), (150.0, 1.0), *back, (30.0, 10.0)]
    assert walk(outside_then_back) == [], "it met the line's extension, not the segment"


def test_each_result_carries_its_zones_where_they_are_and_their_counts_now() -> None:
    config = {"normalized": True,
              "zones": [{"id": "middle", "polygon": [[0.3125, 0], [0.625, 0], [0.625, 1], [0.3125, 1]]}],
              "lines": [{"id": "gate", "start": [0.46875, 1], "end": [0.46875, 0]}]}
    analytics = analytics_for(config)
    counts = []
    for frame_id, box in enumerate(moving_right(0, 100, frames=36)):
        frame = replace(make_frame("cam", frame_id, 320, 240), pts_ms=frame_id * 100.0,
                        captured_monotonic=1000 + frame_id / 10)
        detections = Detections(boxes_xyxy=np.array([box[:4]], np.float32), confidences=np.full(1, 0.9, np.float32),
                                class_ids=np.array([0], np.int64))
        result, _ = analytics.process(FrameResult(frame=frame, task="detect", detections=detections, labels=LABELS))
        zone, line = result.zones
        counts.append((zone.count, line.count))
    assert (zone.zone_id, zone.kind, zone.points) == ("middle", "zone", ((100, 0), (200, 0), (200, 240), (100, 240)))
    assert (line.zone_id, line.kind, line.points) == ("gate", "line", ((150, 240), (150, 0)))
    assert counts[0] == (0, 0) and (1, 0) in counts and (1, 1) in counts and counts[-1] == (0, 1)
