"""Training data in Ultralytics' segmentation layout, sampled from many independent scenes.

Each scene contributes only a few frames so that the data covers many backgrounds, colour schemes and
trajectories rather than many near-identical frames of one scene. Frames are stored as JPEG at varied quality
because the pipeline sees decoded video, never pristine renders.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from pipeline.tools.synth.evaluate import EVAL_SEED_BASE, is_labelled
from pipeline.tools.synth.world import CLASS_NAMES, GroundTruthObject, SceneSpec, plan_scene, render_frame

DEFAULT_SIZES: tuple[tuple[int, int], ...] = (
    (640, 360),
    (480, 640),
    (640, 480),
    (360, 640),
    (512, 512),
    (800, 450),
    (416, 736),
    (320, 240),
)
FRAMES_PER_SCENE = 3
SCENE_FRAMES = 80
_VAL_SEED_OFFSET = 450_000


def scene_seeds(seed: int, count: int, validation: bool) -> range:
    """Disjoint seed ranges for train and validation, all below the range reserved for evaluation."""
    n_scenes = -(-count // FRAMES_PER_SCENE)
    base = (seed * 7919) % 400_000 + (_VAL_SEED_OFFSET if validation else 0)
    if base + n_scenes > (EVAL_SEED_BASE if validation else _VAL_SEED_OFFSET):
        raise ValueError("too many images for the reserved seed range")
    return range(base, base + n_scenes)


def label_lines(objects: Sequence[GroundTruthObject], width: int, height: int) -> list[str]:
    """YOLO segmentation rows (``class x1 y1 x2 y2 ...``, normalised) for the objects worth learning."""
    lines = []
    for obj in objects:
        if not is_labelled(obj) or len(obj.polygon) < 3:
            continue
        pts = np.array(obj.polygon, dtype=np.float64)
        pts[:, 0] = np.clip(pts[:, 0] / width, 0.0, 1.0)
        pts[:, 1] = np.clip(pts[:, 1] / height, 0.0, 1.0)
        lines.append(f"{obj.class_id} " + " ".join(f"{v:.5f}" for v in pts.reshape(-1)))
    return lines


def _write_split(root: Path, split: str, seeds: range, count: int, sizes: Sequence[tuple[int, int]]) -> None:
    images, labels = root / "images" / split, root / "labels" / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    written = 0
    for scene_seed in seeds:
        rng = np.random.default_rng([scene_seed, 0xDA7A])
        w, h = sizes[int(rng.integers(len(sizes)))]
        spec = SceneSpec(
            width=w,
            height=h,
            n_frames=SCENE_FRAMES,
            seed=scene_seed,
            n_objects=int(rng.choice(8, p=[0.04, 0.08, 0.12, 0.16, 0.2, 0.16, 0.14, 0.1])),
        )
        plan = plan_scene(spec)
        picks = rng.choice(SCENE_FRAMES, size=FRAMES_PER_SCENE, replace=False)
        for frame_index in sorted(int(i) for i in picks):
            if written >= count:
                return
            frame, objects = render_frame(spec, frame_index, plan)
            name = f"s{scene_seed:06d}_f{frame_index:03d}"
            quality = int(rng.integers(70, 96))
            cv2.imwrite(str(images / f"{name}.jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
            (labels / f"{name}.txt").write_text("\n".join(label_lines(objects, w, h)) + "\n", encoding="utf-8")
            written += 1


def write_dataset(
    out_dir: Path,
    n_train: int,
    n_val: int,
    seed: int = 0,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
) -> Path:
    """Write a complete dataset under ``out_dir`` and return its ``data.yaml``."""
    root = Path(out_dir).resolve()
    _write_split(root, "train", scene_seeds(seed, n_train, validation=False), n_train, sizes)
    _write_split(root, "val", scene_seeds(seed, n_val, validation=True), n_val, sizes)
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(CLASS_NAMES))
    data_yaml = root / "data.yaml"
    data_yaml.write_text(
        f"path: {root}\ntrain: images/train\nval: images/val\nnc: {len(CLASS_NAMES)}\nnames:\n{names}\n",
        encoding="utf-8",
    )
    return data_yaml
