"""Multi-object tracking, one Ultralytics tracker per stream.

Each stream owns its tracker state and sees only its own frames, in order: sharing one tracker across
the frames of a batch mixes cameras' objects into each other's tracks. After a stream's first frame
(whose detections all start tracks), only confirmed tracks get an id, so a one-frame false detection
never enters the analytics.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from pipeline.frames import Detections, Image, host_image

_TRACKER_FILES = {"bytetrack": "bytetrack.yaml", "botsort": "botsort.yaml"}
TRACKERS_READING_PIXELS = frozenset({"botsort"})  # its camera-motion compensation; ByteTrack only needs the size


class StreamTracker:
    """Assigns stable integer track ids to one stream's detections, frame after frame."""

    def __init__(self, tracker: str) -> None:
        from ultralytics.trackers.bot_sort import BOTSORT
        from ultralytics.trackers.byte_tracker import BYTETracker
        from ultralytics.utils import YAML, IterableSimpleNamespace
        from ultralytics.utils.checks import check_yaml

        settings = IterableSimpleNamespace(**YAML.load(check_yaml(_TRACKER_FILES[tracker])))
        self._reads_pixels = tracker in TRACKERS_READING_PIXELS
        if tracker == "botsort":
            settings.with_reid = False  # appearance features need a second model; motion and IoU suffice here
            self._tracker: Any = BOTSORT(args=settings)
        else:
            self._tracker = BYTETracker(args=settings)

    def update(self, detections: Detections, image: Image) -> Detections:
        """The same detections with `track_ids` filled; None for detections not (yet) in a confirmed track."""
        from ultralytics.engine.results import Boxes

        data = np.concatenate(
            [detections.boxes_xyxy, detections.confidences[:, None], detections.class_ids[:, None].astype(np.float32)],
            axis=1,
        ) if len(detections) else np.zeros((0, 6), np.float32)
        pixels = host_image(image) if self._reads_pixels else image
        tracks = self._tracker.update(Boxes(data, tuple(image.shape[:2])), pixels)
        track_ids: list[int | None] = [None] * len(detections)
        for row in tracks:
            track_ids[int(row[-1])] = int(row[4])
        return replace(detections, track_ids=tuple(track_ids))
