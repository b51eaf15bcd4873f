"""Scoring detections against synthetic ground truth, and an end-to-end check of the shipped model.

Which ground-truth objects a detector is *required* to find is a judgement call, so it is made once here and
reused by the dataset writer: training labels cover every object that is reasonably recognisable
(:func:`is_labelled`), evaluation requires only the clearly visible subset (:func:`is_required`), and anything in
between is "don't care" — a detector is neither rewarded nor punished for it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.tools.synth.clips import load_ground_truth, write_clip
from pipeline.tools.synth.world import GroundTruthObject, SceneSpec

LABEL_MIN_VISIBLE = 0.2
LABEL_MIN_SIDE = 4.0
REQUIRED_MIN_VISIBLE = 0.5
REQUIRED_MIN_SIDE = 12.0
IGNORE_MIN_COVER = 0.5

# Seeds at or above this are never used for training or validation data.
EVAL_SEED_BASE = 900_000

Detection = Mapping[str, Any]


def _box_side(obj: GroundTruthObject) -> float:
    x1, y1, x2, y2 = obj.bbox
    return min(x2 - x1, y2 - y1)


def is_labelled(obj: GroundTruthObject) -> bool:
    """Objects shown to the model as positives: enough of the shape is left to tell its class."""
    return obj.visible_fraction >= LABEL_MIN_VISIBLE and _box_side(obj) >= LABEL_MIN_SIDE


def is_required(obj: GroundTruthObject) -> bool:
    """Objects a correct detector must find: at least half visible and not tiny."""
    return obj.visible_fraction >= REQUIRED_MIN_VISIBLE and _box_side(obj) >= REQUIRED_MIN_SIDE


@dataclass(frozen=True)
class MatchedPair:
    gt_index: int
    detection_index: int
    box_iou: float
    mask_iou: float


@dataclass(frozen=True)
class FrameMatch:
    """Outcome for one frame; indices refer to the ``gt`` and ``detections`` lists passed to match_frame."""

    matches: tuple[MatchedPair, ...]
    missed: tuple[int, ...]  # required ground truth without a matching detection
    false_positives: tuple[int, ...]
    ignored: tuple[int, ...]  # detections of don't-care objects


def _det_box(det: Detection) -> tuple[float, float, float, float]:
    b = det["bbox"]
    return float(b["x1"]), float(b["y1"]), float(b["x2"]), float(b["y2"])


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _cover(det: tuple[float, float, float, float], gt: tuple[float, float, float, float]) -> float:
    """Share of the detection box lying inside the ground-truth box."""
    iw = max(0.0, min(det[2], gt[2]) - max(det[0], gt[0]))
    ih = max(0.0, min(det[3], gt[3]) - max(det[1], gt[1]))
    area = (det[2] - det[0]) * (det[3] - det[1])
    return iw * ih / area if area > 0 else 0.0


def mask_iou(
    a: Sequence[Sequence[float]],
    b: Sequence[Sequence[float]],
    frame_size: tuple[int, int] | None = None,
) -> float:
    """IoU of two pixel polygons, rasterised with cv2.fillPoly on the window that holds both.

    Rasterising only the union window gives the same answer as a full frame (clipped to ``frame_size``
    (width, height) when given) at a fraction of the cost.
    """
    if len(a) == 0 or len(b) == 0:
        return 0.0
    pa = np.round(np.asarray(a, dtype=np.float64)).astype(np.int64)
    pb = np.round(np.asarray(b, dtype=np.float64)).astype(np.int64)
    both = np.concatenate([pa, pb])
    x0, y0 = both.min(axis=0)
    x1, y1 = both.max(axis=0) + 1
    if frame_size is not None:
        x0, y0 = max(int(x0), 0), max(int(y0), 0)
        x1, y1 = min(int(x1), frame_size[0]), min(int(y1), frame_size[1])
        if x1 <= x0 or y1 <= y0:
            return 0.0
    shape = (int(y1 - y0), int(x1 - x0))
    masks = []
    for poly in (pa, pb):
        canvas = np.zeros(shape, dtype=np.uint8)
        cv2.fillPoly(canvas, [(poly - [x0, y0]).astype(np.int32).reshape(-1, 1, 2)], 1)
        masks.append(canvas.astype(bool))
    union = int((masks[0] | masks[1]).sum())
    return int((masks[0] & masks[1]).sum()) / union if union else 0.0


def match_frame(
    gt: Sequence[GroundTruthObject],
    detections: Sequence[Detection],
    iou_threshold: float = 0.5,
    frame_size: tuple[int, int] | None = None,
) -> FrameMatch:
    """Greedy matching in descending confidence, as in the usual detection metrics.

    A detection is a true positive if it overlaps an unmatched required object of its class with box IoU at or
    above the threshold. Otherwise it is ignored when it plausibly shows a don't-care object (IoU above the
    threshold, or mostly inside its box, whatever the class), and a false positive in every other case,
    including duplicates and wrong classes on required objects.
    """
    required = [i for i, g in enumerate(gt) if is_required(g)]
    optional = [i for i, g in enumerate(gt) if not is_required(g)]
    taken: set[int] = set()
    matches: list[MatchedPair] = []
    false_positives: list[int] = []
    ignored: list[int] = []
    order = sorted(range(len(detections)), key=lambda k: -float(detections[k]["confidence"]))
    for d in order:
        det = detections[d]
        box = _det_box(det)
        best, best_iou = -1, iou_threshold
        for g in required:
            if g in taken or gt[g].class_id != int(det["class_id"]):
                continue
            iou = box_iou(box, gt[g].bbox)
            if iou >= best_iou:
                best, best_iou = g, iou
        if best >= 0:
            taken.add(best)
            mask = det.get("mask")
            polygon = mask.get("polygon", []) if mask else []
            matches.append(MatchedPair(best, d, best_iou, mask_iou(polygon, gt[best].polygon, frame_size)))
            continue
        if any(
            box_iou(box, gt[g].bbox) >= iou_threshold or _cover(box, gt[g].bbox) >= IGNORE_MIN_COVER for g in optional
        ):
            ignored.append(d)
        else:
            false_positives.append(d)
    missed = tuple(g for g in required if g not in taken)
    return FrameMatch(tuple(matches), missed, tuple(sorted(false_positives)), tuple(sorted(ignored)))


@dataclass
class AccuracyStats:
    """Running totals over many frames; recall and precision are micro-averaged over objects."""

    true_positives: int = 0
    false_negatives: int = 0
    false_positives: int = 0
    ignored: int = 0
    frames: int = 0
    mask_ious: list[float] = field(default_factory=list)

    def add(self, result: FrameMatch) -> None:
        self.frames += 1
        self.true_positives += len(result.matches)
        self.false_negatives += len(result.missed)
        self.false_positives += len(result.false_positives)
        self.ignored += len(result.ignored)
        self.mask_ious.extend(m.mask_iou for m in result.matches)

    def merge(self, other: AccuracyStats) -> None:
        self.frames += other.frames
        self.true_positives += other.true_positives
        self.false_negatives += other.false_negatives
        self.false_positives += other.false_positives
        self.ignored += other.ignored
        self.mask_ious.extend(other.mask_ious)

    def update(
        self,
        gt: Sequence[GroundTruthObject],
        detections: Sequence[Detection],
        iou_threshold: float = 0.5,
        frame_size: tuple[int, int] | None = None,
    ) -> FrameMatch:
        result = match_frame(gt, detections, iou_threshold, frame_size)
        self.add(result)
        return result

    @property
    def recall(self) -> float:
        total = self.true_positives + self.false_negatives
        return self.true_positives / total if total else 1.0

    @property
    def precision(self) -> float:
        total = self.true_positives + self.false_positives
        return self.true_positives / total if total else 1.0

    @property
    def mean_mask_iou(self) -> float:
        return float(np.mean(self.mask_ious)) if self.mask_ious else math.nan

    def summary(self) -> dict[str, float | int]:
        return {
            "frames": self.frames,
            "required_objects": self.true_positives + self.false_negatives,
            "true_positives": self.true_positives,
            "false_negatives": self.false_negatives,
            "false_positives": self.false_positives,
            "ignored_detections": self.ignored,
            "box_recall": round(self.recall, 4),
            "box_precision": round(self.precision, 4),
            "mean_mask_iou": round(self.mean_mask_iou, 4),
        }


def detections_from_result(result: Any) -> list[dict[str, Any]]:
    """Convert one Ultralytics result into the detection dicts carried in pipeline messages."""
    names = result.names
    boxes = result.boxes
    polygons = result.masks.xy if result.masks is not None else None
    out: list[dict[str, Any]] = []
    for i in range(len(boxes)):
        x1, y1, x2, y2 = (float(v) for v in boxes.xyxy[i].tolist())
        class_id = int(boxes.cls[i])
        mask: dict[str, Any] | None = None
        if polygons is not None and len(polygons[i]) > 0:
            mask = {"polygon": [[float(x), float(y)] for x, y in polygons[i].tolist()]}
        out.append(
            {
                "class_id": class_id,
                "label": str(names[class_id]),
                "confidence": float(boxes.conf[i]),
                "bbox": {"x1": x1, "y1": y1, "x2": x2, "y2": y2},
                "mask": mask,
            }
        )
    return out


def evaluate_clip(
    model: Any, video: Path, gt_frames: Sequence[Sequence[GroundTruthObject]], imgsz: int = 320, conf: float = 0.25
) -> AccuracyStats:
    """Decode the encoded clip (not the pristine render) so compression is part of what is measured."""
    stats = AccuracyStats()
    cap = cv2.VideoCapture(str(video))
    try:
        for gt in gt_frames:
            ok, frame = cap.read()
            if not ok:
                raise RuntimeError(f"{video} ended before its ground truth")
            h, w = frame.shape[:2]
            result = model.predict(frame, imgsz=imgsz, conf=conf, verbose=False)[0]
            stats.update(gt, detections_from_result(result), frame_size=(w, h))
    finally:
        cap.release()
    return stats


def evaluate_model(
    weights: Path,
    sizes: Sequence[tuple[int, int]] = ((640, 360), (480, 640)),
    n_clips: int = 4,
    n_frames: int = 60,
    seed: int = EVAL_SEED_BASE,
    imgsz: int = 320,
    conf: float = 0.25,
    work_dir: Path | None = None,
    precision: str = "torch",
) -> dict[str, dict[str, float | int]]:
    """Score a weights file on freshly generated clips per frame size, and over all of them together.
    `precision`: `torch` (the weights as they are), or `fp32` / `int8` through vap's own OpenVINO export
    (INT8 calibrated as `model.precision: int8` does, on the bundled set for the bundled model)."""
    from ultralytics import YOLO

    model = YOLO(str(_runtime_model(weights, precision, imgsz)), task="segment")
    results: dict[str, dict[str, float | int]] = {}
    overall = AccuracyStats()
    with tempfile.TemporaryDirectory(prefix="vap-eval-") as tmp:
        root = work_dir or Path(tmp)
        for w, h in sizes:
            stats = AccuracyStats()
            for k in range(n_clips):
                spec = SceneSpec(width=w, height=h, n_frames=n_frames, seed=seed + 1000 * w + 10 * h + k)
                video = write_clip(root / f"eval_{w}x{h}_{k}.mp4", spec)
                clip_stats = evaluate_clip(model, video, load_ground_truth(video), imgsz, conf)
                stats.merge(clip_stats)
                overall.merge(clip_stats)
            results[f"{w}x{h}"] = stats.summary()
        results["all"] = overall.summary()
    return results


def _runtime_model(weights: Path, precision: str, imgsz: int) -> str:
    if precision == "torch":
        return str(weights)
    from pipeline.config import ModelConfig
    from pipeline.inference.quantize import calibration_for
    from pipeline.inference.runtimes import default_export_dir, resolve_model

    model = ModelConfig(weights=str(weights), imgsz=imgsz, runtime="openvino", precision=precision)
    int8 = calibration_for(model, []) if precision == "int8" else None
    resolved = resolve_model(str(weights), "openvino", "cpu", imgsz, 1, False, default_export_dir(), int8)
    return resolved.path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure a shapes model end to end on generated clips.")
    shipped = Path(__file__).parent.parent.parent / "assets" / "vap-shapes-seg.pt"
    parser.add_argument("--weights", type=Path, default=shipped)
    parser.add_argument("--clips", type=int, default=4, help="clips per frame size")
    parser.add_argument("--frames", type=int, default=60, help="frames per clip")
    parser.add_argument("--seed", type=int, default=EVAL_SEED_BASE)
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--conf", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", choices=["torch", "fp32", "int8"], default="torch",
                        help="torch: the weights as they are; fp32/int8: vap's OpenVINO export")
    args = parser.parse_args(argv)
    os.environ["YOLO_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(args.threads)
    start = time.monotonic()
    results = evaluate_model(
        args.weights, n_clips=args.clips, n_frames=args.frames, seed=args.seed, imgsz=args.imgsz, conf=args.conf,
        precision=args.precision,
    )
    for name, summary in results.items():
        print(name, " ".join(f"{k}={v}" for k, v in summary.items()))
    print(f"evaluated in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
