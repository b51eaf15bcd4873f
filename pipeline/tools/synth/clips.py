"""Synthetic scenes written as real video files with a ground-truth sidecar.

The pipeline reads cameras and files through OpenCV, so end-to-end checks need an actual encoded clip rather
than in-memory frames; the sidecar keeps the exact ground truth that the encoder cannot carry.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2

from pipeline.tools.synth.world import GroundTruthObject, SceneSpec, _Track, plan_scene, render_frame, render_scene

_FOURCCS = ("avc1", "mp4v")


def ground_truth_path(video: Path) -> Path:
    """Sidecar next to the clip: ``clip.mp4`` -> ``clip.gt.jsonl``."""
    return video.with_name(f"{video.stem}.gt.jsonl")


def _object_to_json(obj: GroundTruthObject) -> dict[str, Any]:
    x1, y1, x2, y2 = obj.bbox
    return {
        "object_id": obj.object_id,
        "class_id": obj.class_id,
        "label": obj.label,
        "bbox": {"x1": x1, "y1": y1, "x2": x2, "y2": y2},
        "polygon": [[x, y] for x, y in obj.polygon],
        "visible_fraction": round(obj.visible_fraction, 6),
        "center": [obj.center[0], obj.center[1]],
    }


def _object_from_json(data: dict[str, Any]) -> GroundTruthObject:
    b = data["bbox"]
    center = data.get("center")
    bbox = (float(b["x1"]), float(b["y1"]), float(b["x2"]), float(b["y2"]))
    return GroundTruthObject(
        object_id=int(data["object_id"]),
        class_id=int(data["class_id"]),
        label=str(data["label"]),
        bbox=bbox,
        polygon=[(float(x), float(y)) for x, y in data["polygon"]],
        visible_fraction=float(data["visible_fraction"]),
        center=(float(center[0]), float(center[1])) if center else ((bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2),
    )


def open_writer(path: Path, fps: float, size: tuple[int, int],
                fourccs: Sequence[str] = _FOURCCS) -> tuple[cv2.VideoWriter, str]:
    """The first of `fourccs` this OpenCV build can encode. By default H.264 for realism, but many builds ship
    without an encoder for it, so MPEG-4 follows."""
    for code in fourccs:
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*code), fps, size)
        if writer.isOpened():
            return writer, code
        writer.release()
    raise RuntimeError(f"no usable MP4 encoder for {path} (tried {', '.join(fourccs)})")


def write_clip(path: Path, spec: SceneSpec) -> Path:
    """Render ``spec`` to an MP4 at ``path`` plus its ground-truth sidecar; return the video path.

    The clip is read back before returning: an encoder that silently writes nothing would otherwise surface
    much later as a confusing pipeline failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer, _ = open_writer(path, spec.fps, (spec.width, spec.height))
    try:
        with ground_truth_path(path).open("w", encoding="utf-8") as sidecar:
            for index, (frame, objects) in enumerate(render_scene(spec)):
                writer.write(frame)
                line = {"frame_index": index, "objects": [_object_to_json(o) for o in objects]}
                sidecar.write(json.dumps(line, separators=(",", ":")) + "\n")
    finally:
        writer.release()
    _verify(path, spec)
    return path


def _verify(path: Path, spec: SceneSpec) -> None:
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise RuntimeError(f"written clip {path} cannot be opened")
        count = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if frame.shape[:2] != (spec.height, spec.width):
                raise RuntimeError(
                    f"{path} decodes as {frame.shape[1]}x{frame.shape[0]}, expected {spec.width}x{spec.height}"
                )
            count += 1
    finally:
        cap.release()
    if count != spec.n_frames:
        raise RuntimeError(f"{path} holds {count} frames, expected {spec.n_frames}")


def load_ground_truth(path: Path) -> list[list[GroundTruthObject]]:
    """Ground truth per frame, from the sidecar itself or from the clip it belongs to."""
    path = Path(path)
    sidecar = path if path.name.endswith(".gt.jsonl") else ground_truth_path(path)
    frames: list[list[GroundTruthObject]] = []
    with sidecar.open(encoding="utf-8") as handle:
        for expected, line in enumerate(handle):
            data = json.loads(line)
            if int(data["frame_index"]) != expected:
                raise ValueError(f"{sidecar}: frame {data['frame_index']} out of order (expected {expected})")
            frames.append([_object_from_json(o) for o in data["objects"]])
    return frames


def write_scripted_clip(path: Path, spec: SceneSpec, tracks: Sequence[_Track]) -> list[list[GroundTruthObject]]:
    """An MP4 of `spec`'s background with exactly `tracks` in it (objects whose paths a test chose), and the
    ground truth of every frame."""
    from dataclasses import replace

    plan = replace(plan_scene(spec), tracks=tuple(tracks))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), spec.fps, (spec.width, spec.height))
    truth = []
    for index in range(spec.n_frames):
        image, objects = render_frame(spec, index, plan)
        writer.write(image)
        truth.append(objects)
    writer.release()
    return truth
