"""The direct inference path (our letterbox, NMS and mask assembly) answers as `YOLO.predict` does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ultralytics.data.augment import LetterBox

from pipeline.config import ModelConfig
from pipeline.inference.detector import UltralyticsDetector, infer
from pipeline.inference.preprocess import DeviceLetterbox, HostLetterbox, plan_batch
from tests.fakes import scene_frames


@pytest.mark.parametrize(("width", "height"), [(640, 360), (480, 640), (200, 120)])
def test_both_letterboxes_build_the_tensor_ultralytics_builds(width: int, height: int) -> None:
    images = [frame.image for frame in scene_frames(width, height, 2, seed=11)]
    reference_images = [LetterBox(320, auto=True, stride=32)(image=image) for image in images]
    reference = torch.from_numpy(np.stack(reference_images)).permute(0, 3, 1, 2).flip(1).float() / 255
    plan = plan_batch(images, 320, 32, rect=True)
    assert plan[0].input_hw == tuple(reference.shape[2:])
    host = HostLetterbox()(images, plan, torch.float32)
    torch.testing.assert_close(host, reference, atol=1e-6, rtol=0)
    device = DeviceLetterbox("cpu")(images, plan, torch.float32)
    assert device.shape == reference.shape
    assert float((device - reference).abs().mean()) < 1.5 / 255
    assert float((device - reference).abs().max()) < 40 / 255


def test_device_letterbox_copy_threads_and_alternating_buffers_keep_each_batch_intact() -> None:
    clips = [scene_frames(320, 180, 3, seed=seed) for seed in (4, 5, 6)]
    batches = [[frame.image for frame in clip] for clip in clips]
    plan = plan_batch(batches[0], 320, 32, rect=True)
    single = DeviceLetterbox("cpu", copy_threads=1)
    pooled = DeviceLetterbox("cpu", copy_threads=3)
    try:
        expected = [single(images, plan, torch.float32) for images in batches]
        built = [pooled(images, plan, torch.float32) for images in batches]
    finally:
        pooled.close()
    for got, want in zip(built, expected, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not torch.equal(built[0], built[2])


def test_mixed_frame_sizes_share_one_square_input() -> None:
    images = [scene_frames(640, 360, 1, seed=1)[0].image, scene_frames(360, 640, 1, seed=2)[0].image]
    plan = plan_batch(images, 320, 32, rect=True)
    assert {box.input_hw for box in plan} == {(320, 320)}
    assert plan[0].resized_hw == (180, 320) and plan[1].resized_hw == (320, 180)
    for build in (HostLetterbox(), DeviceLetterbox("cpu")):
        batch = build(images, plan, torch.float32)
        assert batch.shape == (2, 3, 320, 320)
        assert torch.allclose(batch[0, :, 0, 0], torch.full((3,), 114 / 255))
        assert torch.allclose(batch[1, :, 0, 0], torch.full((3,), 114 / 255))


@pytest.fixture(scope="module")
def detector(model_weights: str) -> UltralyticsDetector:
    return UltralyticsDetector(ModelConfig(weights=model_weights, imgsz=320, conf=0.25, runtime="torch"), "cpu")


def polygon_mask(polygon: np.ndarray, width: int, height: int) -> np.ndarray:
    import cv2

    mask = np.zeros((height, width), np.uint8)
    if len(polygon) >= 3:
        cv2.fillPoly(mask, [np.round(polygon).astype(np.int32)], 1)
    return mask.astype(bool)


@pytest.mark.parametrize("device_letterbox", [False, True])
def test_direct_path_matches_ultralytics_predict(detector: UltralyticsDetector, model_weights: str,
                                                 device_letterbox: bool) -> None:
    from ultralytics import YOLO

    frames = scene_frames(640, 360, 4, seed=77) + scene_frames(480, 640, 4, seed=78)
    if device_letterbox:
        detector._letterbox = DeviceLetterbox("cpu")
    reference_model = YOLO(model_weights)
    compared = 0
    for group in (frames[:4], frames[4:], [frames[0], frames[5]]):
        ours = infer(detector, group)
        theirs = reference_model.predict([f.image for f in group], imgsz=320, conf=0.25, verbose=False)
        for mine, reference in zip(ours, theirs, strict=True):
            reference_boxes = reference.boxes.xyxy.numpy()
            tolerance = 3.0 if device_letterbox else 0.5
            assert len(mine.detections) == len(reference_boxes)
            np.testing.assert_allclose(mine.detections.boxes_xyxy, reference_boxes, atol=tolerance)
            np.testing.assert_array_equal(mine.detections.class_ids, reference.boxes.cls.numpy().astype(np.int64))
            for polygon, reference_polygon in zip(mine.detections.polygons, reference.masks.xy, strict=True):
                assert polygon is not None
                height, width = mine.frame.height, mine.frame.width
                a, b = polygon_mask(polygon, width, height), polygon_mask(reference_polygon, width, height)
                assert (a & b).sum() / max(1, (a | b).sum()) > 0.9
                compared += 1
    assert compared >= 12, "the bundled model should find the shapes"
