"""Optional annotated JPEG thumbnails for dashboards that want a picture next to the numbers.

Thumbnails go to a directory, never into the result topic; the message carries a reference to the file.
Only the newest `keep_last` thumbnails of each stream are kept, so the directory cannot fill a disk, and only
files named as vap names them (`<12-digit frame id>.jpg`) are ever deleted: a folder shared with other files
loses none of them. A thumbnail that cannot be written (a full disk) raises, so no message links to it.
"""

from __future__ import annotations

import re
from collections import deque
from pathlib import Path

import cv2
import numpy as np

from pipeline.config import SnapshotConfig
from pipeline.frames import FrameResult, host_image

OWN_NAME = re.compile(r"\d{12}\.jpg")
_COLOURS = ((56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72))


class SnapshotWriter:
    """Writes every `every_n_frames`-th frame of a stream, boxes and labels drawn in."""

    def __init__(self, config: SnapshotConfig) -> None:
        assert config.dir is not None
        self._config = config
        self._root = config.dir.resolve()
        self._kept: dict[str, deque[Path]] = {}

    def write(self, result: FrameResult) -> str | None:
        """The thumbnail's `file://` URI, or None when this frame gets none."""
        frame = result.frame
        if frame.frame_id % self._config.every_n_frames:
            return None
        scale = min(1.0, self._config.max_width / frame.width)
        full = host_image(frame.image)
        image = full if scale == 1.0 else cv2.resize(
            full, (round(frame.width * scale), round(frame.height * scale)), interpolation=cv2.INTER_AREA
        )
        image = np.ascontiguousarray(image).copy()
        detections = result.detections
        for index in range(len(detections)):
            x1, y1, x2, y2 = (int(v * scale) for v in detections.boxes_xyxy[index])
            class_id = int(detections.class_ids[index])
            colour = _COLOURS[class_id % len(_COLOURS)]
            cv2.rectangle(image, (x1, y1), (x2, y2), colour, 2)
            caption = f"{result.labels.get(class_id, class_id)} {detections.confidences[index]:.2f}"
            cv2.putText(image, caption, (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1)
        directory = self._root / frame.stream_id
        path = directory / f"{frame.frame_id:012d}.jpg"
        kept = self._kept_in(directory, frame.stream_id)
        if not cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, self._config.jpeg_quality]):
            path.unlink(missing_ok=True)  # a partial file from a full disk
            raise OSError(f"OpenCV could not write {path} (a full disk, or no permission)")
        if path not in kept:
            kept.append(path)
        while len(kept) > self._config.keep_last:
            kept.popleft().unlink(missing_ok=True)
        return path.as_uri()

    def _kept_in(self, directory: Path, stream_id: str) -> deque[Path]:
        """The stream's thumbnails, oldest first, counted rather than computed from frame ids: ids have gaps
        (frames dropped before the model), so "the id `keep_last` thumbnails back" may never have been
        written, and nothing would ever be deleted. Files a previous run left count too."""
        kept = self._kept.get(stream_id)
        if kept is None:
            directory.mkdir(parents=True, exist_ok=True)
            own = [path for path in directory.glob("*.jpg") if OWN_NAME.fullmatch(path.name)]
            kept = self._kept[stream_id] = deque(sorted(own, key=_modified))
        return kept


def _modified(path: Path) -> float:
    """Age order for a previous run's files (frame ids restart with each run, so names do not tell)."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
