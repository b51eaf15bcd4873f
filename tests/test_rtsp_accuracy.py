"""Accuracy through a real RTSP camera: a generated clip re-encoded to H.264 by an RTSP server, read live.

A live stream is joined at an unknown point of the looping clip, and a live server repeats or skips a
frame now and then, so the clip frame behind a `frame_id` is only known to within a few frames: the
test finds the offset that fits best overall, then lets each message match the best clip frame within
+-3 of it. Wrong geometry (shifted, scaled or swapped boxes) matches no clip frame, so the thresholds
still prove that boxes and masks come back right through H.264, RTSP and the live reader.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.app import Pipeline
from pipeline.config import parse_config
from pipeline.tools.broker import EmbeddedBroker
from pipeline.tools.demo import SHIPPED_WEIGHTS
from pipeline.tools.synth.clips import load_ground_truth, write_clip
from pipeline.tools.synth.evaluate import AccuracyStats
from pipeline.tools.synth.world import SceneSpec
from tests.conftest import decode, read_topic, unused_topic
from tests.servers.fixtures import RtspServerFactory

pytestmark = pytest.mark.skipif(not SHIPPED_WEIGHTS.is_file(), reason="the bundled model is not in the tree")

CLIP_FRAMES, WIDTH, HEIGHT = 40, 640, 360


def test_detections_read_over_rtsp_match_ground_truth(
    tmp_path: Path, broker: EmbeddedBroker, rtsp_server_factory: RtspServerFactory
) -> None:
    clip = write_clip(tmp_path / "camera.mp4", SceneSpec(width=WIDTH, height=HEIGHT, n_frames=CLIP_FRAMES, seed=6203))
    truth = load_ground_truth(clip)
    server = rtsp_server_factory(clip)
    topic = unused_topic("rtsp-accuracy")
    config = parse_config({
        "streams": [{"id": "camera", "url": server.url}],
        "model": {"weights": str(SHIPPED_WEIGHTS), "imgsz": 320},
        "batching": {"max_batch": 2, "queue_size": 8},
        "kafka": {"bootstrap_servers": broker.bootstrap_servers, "topic": topic},
        "http": {"host": "127.0.0.1", "port": 0},
    })
    pipeline = Pipeline(config)
    pipeline.start()
    try:
        deadline = time.monotonic() + 60
        while pipeline.processed < 30 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        pipeline.stop()
    messages = [decode(r) for r in read_topic(broker.bootstrap_servers, topic, expected=pipeline.processed)]
    assert len(messages) >= 30
    assert all(m["image"] == {"width": WIDTH, "height": HEIGHT} for m in messages)

    def score(offset: int, slack: int = 0) -> AccuracyStats:
        stats = AccuracyStats()
        for message in messages:
            candidates = [truth[(message["frame_id"] + offset + d) % CLIP_FRAMES] for d in range(-slack, slack + 1)]
            matches = [AccuracyStats() for _ in candidates]
            for candidate, trial in zip(candidates, matches, strict=True):
                trial.update(candidate, message["detections"], frame_size=(WIDTH, HEIGHT))
            best_trial = max(matches, key=lambda t: (t.true_positives - t.false_positives, sum(t.mask_ious)))
            stats.merge(best_trial)
        return stats

    ranked: list[tuple[int, Any]] = sorted(((score(o).true_positives, o) for o in range(CLIP_FRAMES)), reverse=True)
    best = score(ranked[0][1], slack=3)
    assert best.recall >= 0.9 and best.precision >= 0.9 and best.mean_mask_iou >= 0.7, best.summary()
    assert score(ranked[-1][1]).recall < 0.5, "a wrong alignment must not score as well"
