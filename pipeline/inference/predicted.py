"""Results of Ultralytics' own `predict` (classification, and the models vap's batch path does not run) as
vap's detections and classes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.frames import Classification, Detections

TOP_CLASSES = 5


def predicted_detections(result: Any) -> Detections:
    boxes = result.boxes
    if boxes is None or len(boxes) == 0:
        return Detections.empty()
    polygons: tuple[Any, ...] = ()
    if result.masks is not None:
        polygons = tuple(np.asarray(polygon, np.float32) for polygon in result.masks.xy)
    return Detections(
        boxes_xyxy=boxes.xyxy.cpu().numpy().astype(np.float32),
        confidences=boxes.conf.cpu().numpy().astype(np.float32),
        class_ids=boxes.cls.cpu().numpy().astype(np.int64),
        polygons=polygons,
    )


def predicted_classes(result: Any, class_filter: Sequence[int] | None, conf: float,
                      labels: dict[int, str]) -> tuple[Classification, ...]:
    """The five likeliest of the kept classes: Ultralytics' classification ignores `classes`, so the
    filter applies here, before the top five are picked, lest a kept class lose its place to others."""
    probs = result.probs
    if probs is None:
        return ()
    scores = np.asarray(probs.cpu().numpy().data, np.float32)
    kept = np.arange(len(scores))
    if class_filter is not None:  # int64 even when empty: np.unique([]) is float, useless as an index
        kept = np.unique(np.asarray(class_filter, np.int64))
    top = kept[np.argsort(-scores[kept], kind="stable")[:TOP_CLASSES]]
    return tuple(
        Classification(int(class_id), labels.get(int(class_id), str(class_id)), float(scores[class_id]))
        for class_id in top
        if float(scores[class_id]) >= conf
    )
