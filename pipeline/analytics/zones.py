"""Zone and line analytics per stream: from tracked boxes to enter, exit, cross and dwell events.

Each tracked object is reduced to one anchor point (bottom-centre by default: where a person or a car
touches the ground). An object enters a zone when its anchor moves inside the polygon or onto its edge
(or first appears there), exits when it moves clearly out or its track expires while inside, dwells once
it has stayed `dwell_s`, and crosses a line when its anchor passes through the segment from clearly one
side to clearly the other. "Clearly" is a band of 1% of the frame's smaller side: an anchor jittering on
an edge or a line by a pixel or two would otherwise enter and exit, or cross, on every wobble.
Time advances by media time when the source gives it, so files read faster than real time dwell correctly,
and by the reader's monotonic clock where media time is missing or goes back (a file that loops, a live
stream that reconnects), so it never runs backwards and tracks always expire.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime

import numpy as np
import numpy.typing as npt

from pipeline.analytics.tracking import StreamTracker
from pipeline.config import AnalyticsConfig, LineConfig, ZoneConfig
from pipeline.frames import FrameResult, ZoneState
from pipeline.inference.model_info import class_ids_for

TRACK_EXPIRY_S = 3.0
# Ultralytics' trackers keep a lost track 30 frames (track_buffer); at low frame rates that outlasts
# TRACK_EXPIRY_S, and a track expired here would come back under the same id as a second enter.
_TRACKER_BUFFER_FRAMES = 31
_BAND = 0.01
_ON_EDGE_PX = 0.5

Point = tuple[float, float]


@dataclass(frozen=True)
class ZoneEvent:
    """One `vap.event.v1` message before encoding."""

    stream_id: str
    event: str
    zone_id: str
    zone_kind: str
    track_id: int
    class_id: int
    label: str
    frame_id: int
    pts_ms: float | None
    occurred_at: datetime
    position: Point
    direction: str | None = None
    dwell_s: float | None = None


@dataclass
class _TrackState:
    """What is known of one track. Its class is the one most often detected so far: a detector that
    calls an object by another class for a frame or two must not rename the track."""

    last_seen_s: float
    anchor: Point
    labels: dict[int, str]
    class_votes: Counter[int] = field(default_factory=Counter)
    inside_since: dict[str, float] = field(default_factory=dict)
    dwelled: set[str] = field(default_factory=set)
    line_sides: dict[str, tuple[int, Point]] = field(default_factory=dict)
    line_band: dict[str, tuple[Point, bool]] = field(default_factory=dict)

    @property
    def class_id(self) -> int:
        return self.class_votes.most_common(1)[0][0]

    @property
    def label(self) -> str:
        return self.labels.get(self.class_id, str(self.class_id))


def anchor_point(box: npt.NDArray[np.float32], anchor: str) -> Point:
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return {
        "bottom_center": (cx, y2), "center": (cx, cy), "top_center": (cx, y1),
        "left_center": (x1, cy), "right_center": (x2, cy),
    }[anchor]


def point_in_polygon(point: Point, polygon: list[Point]) -> bool:
    """Even-odd ray casting; points exactly on an edge count as inside the lower/left side consistently."""
    x, y = point
    inside = False
    for (x1, y1), (x2, y2) in zip(polygon, polygon[1:] + polygon[:1], strict=True):
        if (y1 > y) != (y2 > y):
            crossing_x = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
            if x < crossing_x:
                inside = not inside
    return inside


def distance_to_polygon_edge(point: Point, polygon: list[Point]) -> float:
    return min(distance_to_segment(point, start, end)
               for start, end in zip(polygon, polygon[1:] + polygon[:1], strict=True))


def distance_to_segment(point: Point, start: Point, end: Point) -> float:
    (px, py), (x1, y1), (x2, y2) = point, start, end
    dx, dy = x2 - x1, y2 - y1
    length_sq = dx * dx + dy * dy
    t = 0.0 if length_sq == 0 else min(1.0, max(0.0, ((px - x1) * dx + (py - y1) * dy) / length_sq))
    return float(np.hypot(px - (x1 + t * dx), py - (y1 + t * dy)))


def side_of_line(point: Point, start: Point, end: Point) -> float:
    """Positive on the right-hand side of start->end as drawn on the image (y pointing down), else negative."""
    return (end[0] - start[0]) * (point[1] - start[1]) - (end[1] - start[1]) * (point[0] - start[0])


def crosses_segment(previous: Point, current: Point, start: Point, end: Point) -> int:
    """+1 when the move passes through the segment (its ends included) to its right-hand side, -1 to its
    left, else 0; a move that starts or ends on the line's extension does not cross."""
    after = side_of_line(current, start, end)
    if after == 0 or not path_crosses_segment([previous, current], start, end):
        return 0
    return 1 if after > 0 else -1


def path_crosses_segment(path: list[Point], start: Point, end: Point) -> bool:
    """Whether a path of anchors meets the segment (its ends included) where one step goes from one side of
    its line to the other (or onto it)."""
    dx, dy = end[0] - start[0], end[1] - start[1]
    length_sq = dx * dx + dy * dy or 1.0
    for (ax, ay), (bx, by) in itertools.pairwise(path):
        before, after = side_of_line((ax, ay), start, end), side_of_line((bx, by), start, end)
        if before == after or (before > 0 and after > 0) or (before < 0 and after < 0):
            continue
        u = before / (before - after)
        x, y = ax + u * (bx - ax), ay + u * (by - ay)
        if -1e-9 <= ((x - start[0]) * dx + (y - start[1]) * dy) / length_sq <= 1 + 1e-9:
            return True
    return False


def line_side(point: Point, start: Point, end: Point, band_px: float) -> int:
    """+1 or -1 when the point is clearly on the right or left of the line through the segment, 0 within
    `band_px` of it."""
    length = float(np.hypot(end[0] - start[0], end[1] - start[1])) or 1.0
    distance = side_of_line(point, start, end) / length
    return 0 if abs(distance) <= band_px else (1 if distance > 0 else -1)


class StreamClock:
    """One stream's analytics time in seconds, which never runs backwards nor jumps between time bases.

    Media time alone restarts at 0 when a file loops or a live stream reconnects, and a first frame
    without it would stamp uptime beside later media times; either way tracks would never expire or
    dwell. So the clock advances by the media-time step between consecutive frames that both have one
    and it moves forward, and by the capture-time step otherwise.
    """

    def __init__(self) -> None:
        self._now_s = 0.0
        self._last_pts_ms: float | None = None
        self._last_monotonic: float | None = None

    def advance(self, pts_ms: float | None, captured_monotonic: float) -> float:
        if self._last_monotonic is not None:
            if pts_ms is not None and self._last_pts_ms is not None and pts_ms >= self._last_pts_ms:
                self._now_s += (pts_ms - self._last_pts_ms) / 1000
            else:
                self._now_s += max(0.0, captured_monotonic - self._last_monotonic)
        self._last_pts_ms, self._last_monotonic = pts_ms, captured_monotonic
        return self._now_s


class StreamAnalytics:
    """Tracker plus zone and line state for one stream; fed that stream's results in frame order."""

    def __init__(self, stream_id: str, config: AnalyticsConfig, tracker: str, labels: dict[int, str]) -> None:
        self.stream_id = stream_id
        self.labels = labels
        self._config = config
        self._zone_classes = {
            zone.id: _class_set(zone.classes, labels, f"stream {stream_id}: analytics.zones[{index}].classes")
            for index, zone in enumerate(config.zones)
        }
        self._line_classes = {
            line.id: _class_set(line.classes, labels, f"stream {stream_id}: analytics.lines[{index}].classes")
            for index, line in enumerate(config.lines)
        }
        self._tracker = StreamTracker(tracker)
        self._clock = StreamClock()
        self._tracks: dict[int, _TrackState] = {}
        self._last_s: float | None = None
        self._frame_interval_s = 0.0
        self._crossings = {line.id: 0 for line in config.lines}

    def _scaled(self, points: list[Point], width: int, height: int) -> list[Point]:
        return [(x * width, y * height) for x, y in points] if self._config.normalized else points

    def process(self, result: FrameResult) -> tuple[FrameResult, list[ZoneEvent]]:
        frame = result.frame
        detections = self._tracker.update(result.detections, frame.image)
        result = replace(result, detections=detections)
        now_s = self._clock.advance(frame.pts_ms, frame.captured_monotonic)
        if self._last_s is not None:
            step = now_s - self._last_s
            self._frame_interval_s = step if self._frame_interval_s == 0 else 0.9 * self._frame_interval_s + 0.1 * step
        self._last_s = now_s
        expiry_s = max(TRACK_EXPIRY_S, _TRACKER_BUFFER_FRAMES * self._frame_interval_s)
        band_px = max(1.0, _BAND * min(frame.width, frame.height))
        events: list[ZoneEvent] = []
        zones = [(zone, self._scaled(zone.polygon, frame.width, frame.height)) for zone in self._config.zones]
        lines = [(line, self._scaled([line.start, line.end], frame.width, frame.height)) for line in self._config.lines]

        def emit(kind: str, event: str, zone_id: str, track_id: int, state: _TrackState,
                 direction: str | None = None, dwell_s: float | None = None) -> None:
            events.append(ZoneEvent(
                stream_id=self.stream_id, event=event, zone_id=zone_id, zone_kind=kind, track_id=track_id,
                class_id=state.class_id, label=state.label, frame_id=frame.frame_id, pts_ms=frame.pts_ms,
                occurred_at=frame.captured_at, position=state.anchor, direction=direction, dwell_s=dwell_s,
            ))

        for index, track_id in enumerate(detections.track_ids):
            if track_id is None:
                continue
            class_id = int(detections.class_ids[index])
            anchor = anchor_point(detections.boxes_xyxy[index], self._config.anchor)
            if not all(np.isfinite(anchor)):
                continue
            state = self._tracks.get(track_id)
            if state is None:
                state = _TrackState(now_s, anchor, result.labels)
                self._tracks[track_id] = state
            state.last_seen_s, state.anchor = now_s, anchor
            state.class_votes[class_id] += 1
            for zone, polygon in zones:
                change = self._update_zone(zone, polygon, state, now_s, band_px)
                if change is not None:
                    emit("zone", change[0], zone.id, track_id, state, dwell_s=change[1])
            for line, (start, end) in lines:
                allowed = self._line_classes[line.id]
                if allowed is not None and state.class_id not in allowed:
                    continue
                direction = self._update_line(line.id, start, end, state, band_px)
                if direction:
                    self._crossings[line.id] += 1
                    emit("line", "cross", line.id, track_id, state,
                         direction=line.directions[0 if direction > 0 else 1])
        for track_id, state in list(self._tracks.items()):
            if now_s - state.last_seen_s > expiry_s:
                for zone_id in list(state.inside_since):
                    emit("zone", "exit", zone_id, track_id, state)
                del self._tracks[track_id]
        return replace(result, zones=self._zone_states(zones, lines)), events

    def _zone_states(self, zones: list[tuple[ZoneConfig, list[Point]]],
                     lines: list[tuple[LineConfig, list[Point]]]) -> tuple[ZoneState, ...]:
        inside = {zone.id: 0 for zone, _ in zones}
        for state in self._tracks.values():
            for zone_id in state.inside_since:
                inside[zone_id] = inside.get(zone_id, 0) + 1
        states = [ZoneState(zone.id, "zone", _rounded(polygon), inside[zone.id]) for zone, polygon in zones]
        states += [ZoneState(line.id, "line", _rounded(points), self._crossings[line.id]) for line, points in lines]
        return tuple(states)

    @staticmethod
    def _update_line(line_id: str, start: Point, end: Point, state: _TrackState, band_px: float) -> int:
        """A crossing, counted when the anchor goes from clearly one side to clearly the other through the
        segment; positions within the band (on the line, or wobbling across it) decide nothing."""
        side = line_side(state.anchor, start, end, band_px)
        known = state.line_sides.get(line_id)
        if known is None:
            if side != 0:
                state.line_sides[line_id] = (side, state.anchor)
            return 0
        # Where it went within the band decides where it crossed: each step is checked as it comes, so a
        # long stay in the band costs nothing.
        last, met = state.line_band.get(line_id, (known[1], False))
        met = met or path_crosses_segment([last, state.anchor], start, end)
        if side == 0:
            state.line_band[line_id] = (state.anchor, met)
            return 0
        state.line_band.pop(line_id, None)
        state.line_sides[line_id] = (side, state.anchor)
        return side if met and known[0] != side else 0

    def _update_zone(
        self, zone: ZoneConfig, polygon: list[Point], state: _TrackState, now_s: float, band_px: float
    ) -> tuple[str, float | None] | None:
        """The zone event this observation causes, if any, as (event, dwell seconds).

        The class filter decides who enters; a track inside still exits when its class changes. Boxes are
        clamped to the frame, so an object cut by the frame's edge sits exactly on a zone's edge there: on
        the edge counts as inside, and only a move clearly out is an exit.
        """
        allowed = self._zone_classes[zone.id]
        was_inside = zone.id in state.inside_since
        if allowed is not None and state.class_id not in allowed and not was_inside:
            return None
        in_polygon = point_in_polygon(state.anchor, polygon)
        distance = 0.0 if in_polygon else distance_to_polygon_edge(state.anchor, polygon)
        inside = distance <= (band_px if was_inside else _ON_EDGE_PX)
        if inside and not was_inside:
            state.inside_since[zone.id] = now_s
            state.dwelled.discard(zone.id)
            return "enter", None
        if was_inside and not inside:
            del state.inside_since[zone.id]
            return "exit", None
        if inside and zone.dwell_s is not None and zone.id not in state.dwelled:
            stayed = now_s - state.inside_since[zone.id]
            if stayed >= zone.dwell_s:
                state.dwelled.add(zone.id)
                return "dwell", round(stayed, 3)
        return None

    def occupancy(self) -> dict[tuple[str, str], int]:
        """Objects inside each zone right now, by label."""
        counts: dict[tuple[str, str], int] = {}
        for state in self._tracks.values():
            for zone_id in state.inside_since:
                counts[(zone_id, state.label)] = counts.get((zone_id, state.label), 0) + 1
        return counts


def _rounded(points: list[Point]) -> tuple[tuple[float, float], ...]:
    return tuple((round(float(x), 1), round(float(y), 1)) for x, y in points)


def _class_set(entries: list[int | str] | None, labels: dict[int, str], key_path: str) -> set[int] | None:
    ids = class_ids_for(entries, labels, key_path)
    return None if ids is None else set(ids)
