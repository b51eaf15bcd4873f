"""Unit tests for the synthetic world, its clip/dataset writers and the accuracy evaluator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from pipeline.tools.synth.clips import ground_truth_path, load_ground_truth, write_clip
from pipeline.tools.synth.dataset import write_dataset
from pipeline.tools.synth.evaluate import AccuracyStats, is_required, mask_iou, match_frame
from pipeline.tools.synth.world import (
    CLASS_NAMES,
    GroundTruthObject,
    SceneSpec,
    polygon_mask,
    render_frame,
    render_scene,
)

SMALL = SceneSpec(width=160, height=120, n_frames=30, seed=7, n_objects=5)


def _gt_square(object_id: int, x: float, y: float, side: float, class_id: int = 1) -> GroundTruthObject:
    polygon = [(x, y), (x + side - 1, y), (x + side - 1, y + side - 1), (x, y + side - 1)]
    return GroundTruthObject(
        object_id=object_id,
        class_id=class_id,
        label=CLASS_NAMES[class_id],
        bbox=(x, y, x + side, y + side),
        polygon=polygon,
        visible_fraction=1.0,
        center=(x + side / 2, y + side / 2),
    )


def _as_detection(obj: GroundTruthObject, dx: float = 0.0, confidence: float = 0.9) -> dict[str, Any]:
    x1, y1, x2, y2 = obj.bbox
    return {
        "class_id": obj.class_id,
        "label": obj.label,
        "confidence": confidence,
        "bbox": {"x1": x1 + dx, "y1": y1, "x2": x2 + dx, "y2": y2},
        "mask": {"polygon": [[x + dx, y] for x, y in obj.polygon]},
    }


def test_same_seed_same_scene_and_different_seed_differs() -> None:
    first = list(render_scene(SMALL))
    second = list(render_scene(SMALL))
    assert len(first) == SMALL.n_frames
    for (img_a, gt_a), (img_b, gt_b) in zip(first, second, strict=True):
        assert np.array_equal(img_a, img_b)
        assert gt_a == gt_b
    other = next(render_scene(SceneSpec(width=160, height=120, n_frames=1, seed=8, n_objects=5)))[0]
    assert not np.array_equal(first[0][0], other)


def test_random_access_matches_sequential_rendering() -> None:
    frames = list(render_scene(SMALL))
    image, objects = render_frame(SMALL, 17)
    assert np.array_equal(image, frames[17][0])
    assert objects == frames[17][1]


@pytest.mark.parametrize(("width", "height"), [(640, 360), (480, 640), (97, 53)])
def test_any_frame_size(width: int, height: int) -> None:
    image, objects = render_frame(SceneSpec(width=width, height=height, n_frames=3, seed=1), 2)
    assert image.shape == (height, width, 3)
    assert image.dtype == np.uint8
    for obj in objects:
        x1, y1, x2, y2 = obj.bbox
        assert 0 <= x1 < x2 <= width
        assert 0 <= y1 < y2 <= height


def test_ground_truth_matches_painted_pixels() -> None:
    """The background does not depend on the objects, so painted pixels are exactly where frames differ."""
    empty = SceneSpec(width=160, height=120, n_frames=30, seed=7, n_objects=0)
    checked = 0
    for index in (0, 9, 21, 29):
        image, objects = render_frame(SMALL, index)
        background, none = render_frame(empty, index)
        assert none == []
        painted = (image != background).any(axis=2)
        union = np.zeros_like(painted)
        for obj in objects:
            assert obj.label == CLASS_NAMES[obj.class_id]
            assert 0.0 < obj.visible_fraction <= 1.0
            mask = polygon_mask(obj.polygon, 160, 120)
            ys, xs = np.nonzero(mask)
            assert obj.bbox == (xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0)
            union |= mask
            checked += 1
        iou = (union & painted).sum() / max(1, (union | painted).sum())
        assert iou > 0.97
    assert checked > 5


def test_objects_enter_and_leave() -> None:
    spec = SceneSpec(width=160, height=120, n_frames=120, seed=3, n_objects=3)
    ids_per_frame = [{o.object_id for o in gt} for _, gt in render_scene(spec)]
    first_seen: dict[int, int] = {}
    last_seen: dict[int, int] = {}
    for index, ids in enumerate(ids_per_frame):
        for object_id in ids:
            first_seen.setdefault(object_id, index)
            last_seen[object_id] = index
    assert any(start > 0 for start in first_seen.values()), "no object entered"
    assert any(end < spec.n_frames - 1 for end in last_seen.values()), "no object left"
    partial = [o for _, gt in render_scene(spec) for o in gt if o.bbox[0] == 0 and o.visible_fraction < 1]
    assert partial, "no object was cut by the frame border"


def test_evaluator_perfect_detections() -> None:
    _, objects = render_frame(SMALL, 5)
    assert any(is_required(o) for o in objects)
    stats = AccuracyStats()
    stats.update(objects, [_as_detection(o) for o in objects], frame_size=(160, 120))
    assert stats.recall == 1.0
    assert stats.precision == 1.0
    assert stats.mean_mask_iou == pytest.approx(1.0)


def test_evaluator_counts_shifted_box_as_miss_and_false_positive() -> None:
    gt = [_gt_square(0, 20, 20, 40), _gt_square(1, 100, 60, 30, class_id=0)]
    detections = [_as_detection(gt[0], dx=30), _as_detection(gt[1])]
    result = match_frame(gt, detections)
    assert result.missed == (0,)
    assert result.false_positives == (0,)
    assert [m.gt_index for m in result.matches] == [1]
    stats = AccuracyStats()
    stats.add(result)
    assert stats.recall == pytest.approx(0.5)
    assert stats.precision == pytest.approx(0.5)


def test_evaluator_wrong_class_duplicates_and_dont_care() -> None:
    gt = [_gt_square(0, 20, 20, 40)]
    hidden = GroundTruthObject(1, 2, "triangle", (100, 50, 130, 80), [(100, 50), (129, 50), (100, 79)], 0.3, (110, 60))
    wrong_class = {**_as_detection(gt[0]), "class_id": 0, "label": "circle"}
    duplicate = _as_detection(gt[0], confidence=0.5)
    on_hidden = _as_detection(_gt_square(5, 100, 50, 30), confidence=0.8)
    result = match_frame([*gt, hidden], [wrong_class, _as_detection(gt[0]), duplicate, on_hidden])
    assert [m.detection_index for m in result.matches] == [1]
    assert result.false_positives == (0, 2)
    assert result.ignored == (3,)
    assert result.missed == ()


def test_mask_iou_of_half_overlap() -> None:
    a = [(0.0, 0.0), (9.0, 0.0), (9.0, 9.0), (0.0, 9.0)]
    b = [(5.0, 0.0), (14.0, 0.0), (14.0, 9.0), (5.0, 9.0)]
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, b) == pytest.approx(50 / 150)
    assert mask_iou(a, []) == 0.0


def test_clip_round_trip(tmp_path: Path) -> None:
    spec = SceneSpec(width=160, height=120, n_frames=12, seed=11)
    video = write_clip(tmp_path / "clip.mp4", spec)
    assert video.exists() and ground_truth_path(video).exists()
    loaded = load_ground_truth(video)
    expected = [gt for _, gt in render_scene(spec)]
    assert len(loaded) == spec.n_frames
    for got, want in zip(loaded, expected, strict=True):
        assert [(o.object_id, o.class_id, o.bbox, o.polygon) for o in got] == [
            (o.object_id, o.class_id, o.bbox, o.polygon) for o in want
        ]
    cap = cv2.VideoCapture(str(video))
    ok, frame = cap.read()
    cap.release()
    assert ok and frame.shape == (120, 160, 3)


def test_dataset_layout(tmp_path: Path) -> None:
    data_yaml = write_dataset(tmp_path / "ds", n_train=4, n_val=2, seed=3, sizes=[(160, 120), (96, 128)])
    text = data_yaml.read_text()
    for name in CLASS_NAMES:
        assert name in text
    images = sorted((tmp_path / "ds" / "images" / "train").glob("*.jpg"))
    labels = sorted((tmp_path / "ds" / "labels" / "train").glob("*.txt"))
    assert len(images) == 4 and len(labels) == 4
    assert len(list((tmp_path / "ds" / "images" / "val").glob("*.jpg"))) == 2
    rows = [line.split() for path in labels for line in path.read_text().splitlines() if line]
    assert rows, "no labelled objects"
    for row in rows:
        assert int(row[0]) in range(len(CLASS_NAMES))
        coords = [float(v) for v in row[1:]]
        assert len(coords) >= 6 and len(coords) % 2 == 0
        assert all(0.0 <= v <= 1.0 for v in coords)


def test_objects_only_vanish_at_the_border_or_behind_others() -> None:
    spec = SceneSpec(width=200, height=150, n_frames=150, seed=5, n_objects=4)
    last: dict[int, tuple[int, GroundTruthObject]] = {}
    for index, (_, objects) in enumerate(render_scene(spec)):
        for obj in objects:
            last[obj.object_id] = (index, obj)
    gone = [obj for index, obj in last.values() if index < spec.n_frames - 1]
    assert gone
    for obj in gone:
        x1, y1, x2, y2 = obj.bbox
        at_border = x1 == 0 or y1 == 0 or x2 == spec.width or y2 == spec.height
        assert at_border or obj.visible_fraction < 0.5, obj
