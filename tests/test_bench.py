"""The bench's host-ceiling run: vap with an instant model, looping clips, timed over a frame target."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.bench import BenchOptions, ReplayDetector, looping, run_vap, vap_config
from pipeline.broker import EmbeddedBroker
from pipeline.frames import Detections, Frame, FrameResult
from tests.conftest import CLIP_FRAMES, decode, read_topic, unused_topic


def _sample(frame_id: int, boxes: list[list[float]]) -> FrameResult:
    frame = Frame("sample", frame_id, None, datetime.now(timezone.utc), 0.0, np.zeros((4, 4, 3), np.uint8))
    detections = Detections(np.array(boxes, np.float32), np.full(len(boxes), 0.5, np.float32),
                            np.zeros(len(boxes), np.int64))
    return FrameResult(frame=frame, task="detect", detections=detections, labels={0: "box"})


def test_host_ceiling_loops_the_clips_until_the_target_and_publishes_the_replayed_detections(
        broker: EmbeddedBroker, clips: dict[str, Path], model_weights: str) -> None:
    options = BenchOptions(streams=2, frames=CLIP_FRAMES, width=320, height=192, imgsz=160, batch=4, device="cpu")
    samples = [_sample(0, [[1, 2, 3, 4]]), _sample(1, [[10, 20, 30, 40], [5, 6, 7, 8]])]
    replay = ReplayDetector("replay", "detect", "cpu", {0: "box"}, samples)
    topic = unused_topic("ceiling")
    target = 3 * options.streams * CLIP_FRAMES
    config = looping(vap_config(options, model_weights, [clips["landscape"]] * 2, broker.bootstrap_servers, topic,
                                False))

    measured = run_vap(config, "ceiling", "cpu", timeout_s=60, detector_factory=lambda _c, _d: replay,
                       until_frames=target)

    assert measured.frames >= target, "the clips loop until the target, though each holds far fewer frames"
    assert measured.fps > 0 and measured.latency_p99_ms is not None
    messages = [decode(record) for record in read_topic(broker.bootstrap_servers, topic, measured.frames)]
    assert len(messages) >= measured.frames
    assert max(message["frame_id"] for message in messages) >= CLIP_FRAMES, "frame ids go on past one pass"
    for message in messages:
        expected = samples[message["frame_id"] % 2].detections.boxes_xyxy.tolist()
        assert [[d["bbox"][k] for k in ("x1", "y1", "x2", "y2")] for d in message["detections"]] == expected
