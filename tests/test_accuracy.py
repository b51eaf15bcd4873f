"""End-to-end accuracy: generated clips -> the real pipeline -> a real broker -> a consumer -> ground truth.

How geometry bugs are caught (boxes are matched to ground truth by IoU >= 0.5, class included):
- shifted boxes: a shift of a third of an object's size already drops its IoU below 0.5, so recall and
  precision collapse (`test_the_metric_fails_on_shifted_boxes_and_on_the_wrong_stream` proves the metric
  does fail for a 30 px shift);
- scaled boxes (coordinates left in the model's 320 px input space, or letterbox padding not removed):
  boxes land at the wrong place and size, so IoU fails; the clips are 640x360 and 480x640, two aspect
  ratios whose letterboxing pads different axes, so a fix that only works for one of them fails the other;
- swapped x/y: on non-square frames swapped coordinates fall elsewhere (often outside the frame);
- results taken from the wrong stream: the two streams show different scenes, and the negative control
  shows that scoring one stream's messages against the other's ground truth fails.
Mask polygons are rasterised and compared with the ground-truth masks (mean IoU of matched objects).
"""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.tools.broker import EmbeddedBroker
from pipeline.tools.demo import SHIPPED_WEIGHTS
from pipeline.tools.synth.clips import load_ground_truth, write_clip
from pipeline.tools.synth.evaluate import AccuracyStats
from pipeline.tools.synth.world import GroundTruthObject, SceneSpec
from tests.conftest import decode, read_topic, run_to_completion, unused_topic

SIZES = {"wide": (640, 360, 5101), "tall": (480, 640, 5102)}
FRAMES = 30
MIN_RECALL, MIN_PRECISION, MIN_MASK_IOU = 0.9, 0.9, 0.7

pytestmark = pytest.mark.skipif(not SHIPPED_WEIGHTS.is_file(), reason="the bundled model is not in the tree")


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, broker: EmbeddedBroker) -> dict[str, Any]:
    """Run the pipeline once over both clips; every test reads the same real messages."""
    directory = tmp_path_factory.mktemp("accuracy")
    clips = {name: write_clip(directory / f"{name}.mp4", SceneSpec(width=w, height=h, n_frames=FRAMES, seed=seed))
             for name, (w, h, seed) in SIZES.items()}
    topic = unused_topic("accuracy")
    from pipeline.config import parse_config

    config = parse_config({
        "streams": [{"id": name, "url": str(path), "realtime": False} for name, path in clips.items()],
        "model": {"weights": str(SHIPPED_WEIGHTS), "imgsz": 320, "conf": 0.25},
        "batching": {"max_batch": 4, "max_wait_ms": 10},
        "kafka": {"bootstrap_servers": broker.bootstrap_servers, "topic": topic},
        "http": {"host": "127.0.0.1", "port": 0},
    })
    run_to_completion(config, timeout_s=180)
    messages: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in SIZES}
    for record in read_topic(broker.bootstrap_servers, topic, expected=2 * FRAMES):
        message = decode(record)
        messages[message["stream_id"]][message["frame_id"]] = message
    return {"messages": messages, "truth": {name: load_ground_truth(path) for name, path in clips.items()}}


def score(messages: dict[int, dict[str, Any]], truth: list[list[GroundTruthObject]], size: tuple[int, int],
          shift: float = 0.0) -> AccuracyStats:
    stats = AccuracyStats()
    for frame_id, objects in enumerate(truth):
        detections = messages[frame_id]["detections"]
        if shift:
            detections = [{**d, "bbox": {k: v + shift if k.startswith("x") else v for k, v in d["bbox"].items()}}
                          for d in detections]
        stats.update(objects, detections, frame_size=size)
    return stats


@pytest.mark.parametrize("name", list(SIZES))
def test_boxes_and_masks_match_ground_truth_in_source_pixels(published: dict[str, Any], name: str) -> None:
    width, height, _ = SIZES[name]
    messages = published["messages"][name]
    assert sorted(messages) == list(range(FRAMES)), "one message per frame"
    assert all(m["image"] == {"width": width, "height": height} for m in messages.values())
    stats = score(messages, published["truth"][name], (width, height))
    summary = stats.summary()
    assert summary["required_objects"] >= FRAMES, "the clip must contain enough objects to measure"
    assert stats.recall >= MIN_RECALL, summary
    assert stats.precision >= MIN_PRECISION, summary
    assert stats.mean_mask_iou >= MIN_MASK_IOU, summary


def test_the_metric_fails_on_shifted_boxes_and_on_the_wrong_stream(published: dict[str, Any]) -> None:
    wide, tall = published["messages"]["wide"], published["messages"]["tall"]
    shifted = score(wide, published["truth"]["wide"], (640, 360), shift=30.0)
    assert shifted.recall < 0.5, "a 30 px shift must fail the IoU match"
    swapped = score(tall, published["truth"]["wide"], (640, 360))
    assert swapped.recall < 0.5, "another stream's results must not match this stream's ground truth"
