"""Tracking and zone events end to end, against counts computed from the generator's ground truth.

Two streams at once, each with its own zone and line. Objects follow scripted straight trajectories
(known exactly), rendered by the synthetic world, decoded from MP4, detected by the bundled model,
tracked per stream, and turned into vap.event.v1 messages on a real broker. The expected events come
from the ground-truth boxes of the generator, through the same anchor rule, never from the pipeline.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from pipeline.analytics.zones import anchor_point, crosses_segment, point_in_polygon
from pipeline.app import Pipeline
from pipeline.config import parse_config
from pipeline.publishing.messages import load_schema
from pipeline.tools.broker import EmbeddedBroker
from pipeline.tools.demo import SHIPPED_WEIGHTS
from pipeline.tools.synth.clips import write_scripted_clip
from pipeline.tools.synth.evaluate import box_iou
from pipeline.tools.synth.world import GroundTruthObject, SceneSpec, _Track
from tests.conftest import decode, metric_value, read_topic, run_to_completion, scrape, unused_topic

pytestmark = pytest.mark.skipif(not SHIPPED_WEIGHTS.is_file(), reason="the bundled model is not in the tree")

FRAMES = 70
# Measured with the bundled model: 1 switch over the 4 tracks (a track re-started as an object that entered
# through the frame edge became fully visible); the bound leaves room for one more.
MAX_ID_SWITCHES_PER_TRACK = 0.5


def scripted_track(object_id: int, class_id: int, start: tuple[float, float], velocity: tuple[float, float],
                   size: float, colour: tuple[float, float, float]) -> _Track:
    return _Track(object_id=object_id, class_id=class_id, start_frame=0, end_frame=FRAMES - 1, x0=start[0],
                  y0=start[1], vx=velocity[0], vy=velocity[1], bounce_frames=0, size=size, angle0=0.3, spin=0.02,
                  colour=colour, shade=(0.0, 0.0), z=float(object_id))


SCENES: dict[str, dict[str, Any]] = {
    "street": {
        "size": (640, 360), "seed": 8801,
        "tracks": [scripted_track(1, 0, (-40, 110), (11, 0), 30, (40, 40, 230)),
                   scripted_track(2, 1, (700, 250), (-11, 0), 32, (230, 200, 40))],
        "analytics": {"zones": [{"id": "crossing", "polygon": [[220, 60], [420, 60], [420, 330], [220, 330]]}],
                      "lines": [{"id": "kerb", "start": [320, 350], "end": [320, 20],
                                 "directions": ["eastbound", "westbound"]}]},
    },
    "corridor": {
        "size": (480, 640), "seed": 8802,
        "tracks": [scripted_track(1, 2, (140, -40), (0, 11), 34, (60, 220, 60)),
                   scripted_track(2, 0, (340, 680), (0, -11), 30, (220, 60, 200))],
        "analytics": {"zones": [{"id": "hall", "polygon": [[40, 220], [440, 220], [440, 440], [40, 440]]}],
                      "lines": [{"id": "door", "start": [20, 330], "end": [460, 330],
                                 "directions": ["southbound", "northbound"]}]},
    },
}


def render_clip(path: Path, scene: dict[str, Any]) -> list[list[GroundTruthObject]]:
    width, height = scene["size"]
    spec = SceneSpec(width=width, height=height, n_frames=FRAMES, fps=10.0, seed=scene["seed"], n_objects=0)
    return write_scripted_clip(path, spec, scene["tracks"])


def expected_events(truth: list[list[GroundTruthObject]], analytics: dict[str, Any]) -> Counter[tuple[str, ...]]:
    """Events implied by the ground-truth boxes of objects clearly in view, through the same anchor rule."""
    expected: Counter[tuple[str, ...]] = Counter()
    inside: dict[tuple[int, str], bool] = {}
    previous: dict[int, tuple[float, float]] = {}
    for objects in truth:
        for obj in objects:
            if obj.visible_fraction < 0.9:
                continue
            anchor = anchor_point(obj.bbox, "bottom_center")  # type: ignore[arg-type]
            for zone in analytics["zones"]:
                now = point_in_polygon(anchor, [tuple(p) for p in zone["polygon"]])
                before = inside.get((obj.object_id, zone["id"]), False)
                if now != before:
                    expected[("enter" if now else "exit", zone["id"], "", obj.label)] += 1
                inside[(obj.object_id, zone["id"])] = now
            if obj.object_id in previous:
                for line in analytics["lines"]:
                    direction = crosses_segment(previous[obj.object_id], anchor, tuple(line["start"]),
                                                tuple(line["end"]))
                    if direction:
                        name = line["directions"][0 if direction > 0 else 1]
                        expected[("cross", line["id"], name, obj.label)] += 1
            previous[obj.object_id] = anchor
    return expected


@pytest.mark.parametrize("analytics_processes", [0, 2])
def test_two_streams_give_exact_zone_and_line_counts_with_stable_track_ids(
    tmp_path: Path, broker: EmbeddedBroker, analytics_processes: int
) -> None:
    """With `analytics.processes`, each stream's analytics runs in a worker process, and every count is the same."""
    truth = {name: render_clip(tmp_path / f"{name}.mp4", scene) for name, scene in SCENES.items()}
    frames_topic, events_topic = unused_topic("tracked"), unused_topic("events")
    config = parse_config({
        "streams": [{"id": name, "url": str(tmp_path / f"{name}.mp4"), "realtime": False,
                     "analytics": scene["analytics"]} for name, scene in SCENES.items()],
        "model": {"weights": str(SHIPPED_WEIGHTS), "imgsz": 320, "agnostic_nms": True},
        "batching": {"max_batch": 4},
        "tracking": {"events_topic": events_topic},
        "analytics": {"processes": analytics_processes},
        "kafka": {"bootstrap_servers": broker.bootstrap_servers, "topic": frames_topic},
        "http": {"host": "127.0.0.1", "port": 0},
    })
    scraped: list[str] = []

    def scrape_metrics(running: Pipeline) -> None:
        assert running.http is not None
        scraped.append(scrape(running.http.port))

    pipeline = run_to_completion(config, timeout_s=240, before_stop=scrape_metrics)
    workers = pipeline.analytics.processes if pipeline.analytics is not None else None
    assert metric_value(scraped[0], "vap_helper_processes", kind="analytics") == analytics_processes
    assert metric_value(scraped[0], "vap_helper_processes", kind="kafka_client") == 1
    assert (workers.frames_in_workers if workers is not None else 0) == (2 * FRAMES if analytics_processes else 0)

    wanted = {name: expected_events(truth[name], scene["analytics"]) for name, scene in SCENES.items()}
    # The pipeline has stopped, so every event is in Kafka: reading stops once the expected number came (an
    # extra one arrives in the same fetch).
    expected = sum(sum(want.values()) for want in wanted.values())
    events = [decode(r) for r in read_topic(broker.bootstrap_servers, events_topic, expected=expected, timeout_s=8)]
    schema = load_schema("vap.event.v1")
    got: dict[str, Counter[tuple[str, ...]]] = defaultdict(Counter)
    for event in events:
        jsonschema.validate(event, schema)
        got[event["stream_id"]][(event["event"], event["zone_id"], event["direction"] or "", event["label"])] += 1
    for name in SCENES:
        want = wanted[name]
        assert sum(want.values()) >= 6, f"{name}: the scene must produce events to count"
        assert got[name] == want, f"{name}: events differ from ground truth"
        registry = pipeline.registry
        for (kind, zone, _direction, label), count in want.items():
            value = registry.get_sample_value("vap_zone_events_total",
                                              {"stream": name, "zone": zone, "event": kind, "label": label})
            assert value is not None and value >= count

    frames = [decode(r) for r in read_topic(broker.bootstrap_servers, frames_topic, expected=2 * FRAMES)]
    counted = [id_switches([m for m in frames if m["stream_id"] == name], truth[name]) for name in SCENES]
    switches, tracks = sum(c[0] for c in counted), sum(c[1] for c in counted)
    assert tracks == 4 and switches / tracks <= MAX_ID_SWITCHES_PER_TRACK, f"{switches} switches over {tracks} tracks"


def id_switches(messages: list[dict[str, Any]], truth: list[list[GroundTruthObject]]) -> tuple[int, int]:
    """Track-id changes while each ground-truth object is fully in view, matching detections by box IoU >= 0.5."""
    seen: dict[int, list[int]] = defaultdict(list)
    for message in sorted(messages, key=lambda m: m["frame_id"]):
        for obj in truth[message["frame_id"]]:
            if obj.visible_fraction < 0.9:
                continue
            overlaps = [(box_iou(bbox_tuple(d), obj.bbox), d) for d in message["detections"]]
            best_iou, best = max(overlaps, key=lambda pair: pair[0], default=(0.0, None))
            if best is None or best_iou < 0.5 or best["track_id"] is None:
                continue
            if not seen[obj.object_id] or seen[obj.object_id][-1] != best["track_id"]:
                seen[obj.object_id].append(best["track_id"])
    return sum(len(ids) - 1 for ids in seen.values()), len(seen)


def bbox_tuple(detection: dict[str, Any]) -> tuple[float, float, float, float]:
    box = detection["bbox"]
    return (box["x1"], box["y1"], box["x2"], box["y2"])
