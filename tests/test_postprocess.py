"""Batched NMS over a whole batch keeps exactly what Ultralytics' per-image NMS keeps."""

from __future__ import annotations

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
