"""Batched NMS over a whole batch keeps exactly what Ultralytics' per-image NMS keeps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ultralytics.utils import nms

from pipeline.inference.postprocess import batched_nms


def crowded_predictions(batch: int, classes: int, extra: int, anchors: int, seed: int) -> torch.Tensor:
    """Boxes clustered around a few centres, so NMS has real overlaps to resolve."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand((batch, 1, 6, 2), generator=generator) * 280 + 20
    pick = torch.randint(0, 6, (batch, anchors), generator=generator)
    xy = centres[0, 0][pick] + torch.randn((batch, anchors, 2), generator=generator) * 6
    wh = 30 + torch.rand((batch, anchors, 2), generator=generator) * 20
    scores = torch.rand((batch, anchors, classes), generator=generator) ** 3
    coefficients = torch.randn((batch, anchors, extra), generator=generator)
    return torch.cat([xy, wh, scores, coefficients], -1).transpose(1, 2).contiguous()


@pytest.mark.parametrize(("agnostic", "classes"), [(False, None), (True, None), (False, [0, 2])])
def test_batched_nms_keeps_what_ultralytics_keeps(agnostic: bool, classes: list[int] | None) -> None:
    prediction = crowded_predictions(batch=5, classes=3, extra=4, anchors=400, seed=3)
    rows, image_index = batched_nms(prediction, 3, conf=0.25, iou=0.5, classes=classes, agnostic=agnostic,
                                    input_hw=(320, 320))
    reference = nms.non_max_suppression(prediction.clone(), 0.25, 0.5, classes, agnostic, max_det=300, nc=3)
    assert sum(len(r) for r in reference) > 20, "the scene should leave many boxes"
    for image, expected in enumerate(reference):
        mine = rows[image_index == image]
        assert len(mine) == len(expected)
        order = expected[:, 4].argsort(descending=True)
        torch.testing.assert_close(mine, expected[order], atol=1e-4, rtol=1e-5)
    assert torch.all(image_index[1:] >= image_index[:-1]), "rows are grouped by image"


def test_no_candidates_gives_empty_rows() -> None:
    prediction = crowded_predictions(batch=2, classes=3, extra=0, anchors=50, seed=1)
    prediction[:, 4:7] = 0.0
    rows, image_index = batched_nms(prediction, 3, 0.25, 0.5, None, False, (320, 320))
    assert rows.shape == (0, 6) and image_index.shape == (0,)


def grid_predictions(batch: int, side: int, classes: int) -> torch.Tensor:
    """`side`² small boxes per image that never overlap, each with its own score, so NMS keeps them all."""
    generator = torch.Generator().manual_seed(7)
    centres = (torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1) * 8 + 4)
    xy = centres.reshape(1, -1, 2).float().expand(batch, -1, -1)
    wh = torch.full_like(xy, 4.0)
    scores = torch.rand((batch, side * side, classes), generator=generator)
    return torch.cat([xy, wh, scores], -1).transpose(1, 2).contiguous()


def test_each_image_keeps_its_300_most_confident_rows_as_ultralytics_does() -> None:
    prediction = grid_predictions(batch=3, side=20, classes=2)
    rows, image_index = batched_nms(prediction, 2, 0.0, 0.5, None, False, (160, 160))
    reference = nms.non_max_suppression(prediction.clone(), 0.0, 0.5, None, False, max_det=300, nc=2)
    assert torch.bincount(image_index).tolist() == [300, 300, 300]
    for image, expected in enumerate(reference):
        torch.testing.assert_close(rows[image_index == image], expected)


def test_a_busy_image_does_not_take_the_candidate_places_of_the_others() -> None:
    """Over 30,000 candidates in all, as with `conf: 0` at large inputs: the cap applies to each image."""
    anchors = 30_001
    prediction = torch.zeros((2, 5, anchors))
    prediction[:, 0:2] = 100.0
    prediction[:, 2:4] = 10.0
    prediction[0, 4] = torch.linspace(0.9, 0.8, anchors)  # one crowd of identical boxes
    prediction[1, 0, :3] = torch.tensor([20.0, 60.0, 140.0])  # three apart, all below the crowd's scores
    prediction[1, 4, :3] = torch.tensor([0.5, 0.4, 0.3])
    rows, image_index = batched_nms(prediction, 1, 0.1, 0.5, None, False, (320, 320))
    reference = nms.non_max_suppression(prediction.clone(), 0.1, 0.5, None, False, max_det=300, nc=1)
    assert [len(expected) for expected in reference] == [1, 3]
    assert image_index.tolist() == [0, 1, 1, 1]
    for image, expected in enumerate(reference):
        torch.testing.assert_close(rows[image_index == image], expected)


def test_masks_built_a_few_at_a_time_equal_those_built_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.inference.postprocess
    from pipeline.inference.postprocess import assemble
    from pipeline.inference.preprocess import plan_batch

    generator = torch.Generator().manual_seed(11)
    plan = plan_batch([np.zeros((90, 160, 3), np.uint8)] * 2, 160, 32, True)
    corners = torch.rand((7, 2), generator=generator) * 80
    rows = torch.cat([corners, corners + 10 + torch.rand((7, 2), generator=generator) * 60,
                      torch.rand((7, 1), generator=generator), torch.zeros((7, 1)),
                      torch.randn((7, 32), generator=generator)], 1)
    image_index = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    protos = torch.randn((2, 32, 24, 40), generator=generator)
    at_once = assemble(rows, image_index, plan, protos)
    monkeypatch.setattr(pipeline.inference.postprocess, "_MASK_PIXELS_AT_ONCE", 3 * 96 * 160)
    in_parts = assemble(rows, image_index, plan, protos)
    assert at_once.masks is not None and in_parts.masks is not None and at_once.masks.shape == (7, 96, 160)
    assert int(at_once.masks.sum()) > 0 and torch.equal(in_parts.masks, at_once.masks)


def test_polygons_traced_on_box_crops_equal_ultralytics_whole_mask_polygons() -> None:
    from ultralytics.utils.ops import masks2segments

    from pipeline.inference.postprocess import mask_polygons

    generator = np.random.default_rng(5)
    height, width = 96, 128
    boxes = np.array([[10.3, 12.7, 60.2, 50.9],   # one blob
                      [0.0, 0.0, 40.0, 30.0],     # touching the top-left edge
                      [70.5, 40.2, 128.0, 96.0],  # touching the bottom-right edge, several blobs
                      [20.0, 20.0, 30.0, 30.0]],  # empty
                     np.float32)
    masks = np.zeros((len(boxes), height, width), np.uint8)
    for index, (x1, y1, x2, y2) in enumerate(boxes[:3]):
        noise = generator.random((height, width)) > (0.3 if index == 2 else 0.0)
        ys, xs = np.mgrid[0:height, 0:width]
        inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
        masks[index] = (inside & noise).astype(np.uint8)
    expected = masks2segments(masks)
    got = mask_polygons(masks, boxes)
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert len(got[3]) == 0 and len(got[2]) > len(got[0])


@pytest.mark.parametrize("frame_hw", [(90, 160), (160, 90)])
def test_masks_upsampled_inside_their_boxes_give_the_polygons_of_whole_masks(frame_hw: tuple[int, int]) -> None:
    """The CPU's way (each mask's logits upsampled only inside its box) and the GPU's (whole masks, of which only
    each box's window leaves the device) against whole masks cropped on the host, on letterboxed frames with
    padding on either axis and boxes that reach past the picture."""
    from pipeline.inference.postprocess import assemble, frame_detections, pack_mask_windows
    from pipeline.inference.preprocess import plan_batch

    generator = torch.Generator().manual_seed(13)
    plan = plan_batch([np.zeros((*frame_hw, 3), np.uint8)] * 3, 160, 32, True)
    input_h, input_w = plan[0].input_hw
    count = 12
    corners = torch.rand((count, 2), generator=generator) * torch.tensor([input_w, input_h]) - 8
    rows = torch.cat([corners, corners + 4 + torch.rand((count, 2), generator=generator) * 70,
                      torch.rand((count, 1), generator=generator), torch.zeros((count, 1)),
                      torch.randn((count, 32), generator=generator)], 1)
    image_index = torch.tensor([0] * 5 + [1] * 7)
    protos = torch.nn.functional.avg_pool2d(  # smooth, as a model's are, so masks have real outlines
        torch.randn((3, 32, input_h // 4 + 2, input_w // 4 + 2), generator=generator), 3, stride=1)

    whole = frame_detections(assemble(rows, image_index, plan, protos, full_masks=True), plan)
    windows = frame_detections(assemble(rows, image_index, plan, protos, full_masks=False), plan)
    packed_found = pack_mask_windows(assemble(rows, image_index, plan, protos, full_masks=True), plan)
    packed = frame_detections(packed_found, plan)  # the GPU's: whole masks, only their windows copied out

    assert packed_found.masks is None and packed_found.mask_pixels is not None
    assert packed_found.mask_pixels.numel() < count * input_h * input_w / 4
    for way in (windows, packed):
        outlines = 0
        for expected, got in zip(whole, way, strict=True):
            np.testing.assert_array_equal(got.boxes_xyxy, expected.boxes_xyxy)
            assert len(got.polygons) == len(expected.polygons)
            for ours, theirs in zip(got.polygons, expected.polygons, strict=True):
                np.testing.assert_array_equal(ours, theirs)
                outlines += 1
        assert outlines >= 8, "most masks should have pixels set"
