"""Batched NMS over a whole batch keeps exactly what Ultralytics' per-image NMS keeps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ultralytics.utils import nms

from pipeline.postprocess import batched_nms


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


def test_polygons_traced_on_box_crops_equal_ultralytics_whole_mask_polygons() -> None:
    from ultralytics.utils.ops import masks2segments

    from pipeline.postprocess import mask_polygons

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
