"""The bundled model's INT8 calibration set: frames of the synthetic world it was trained on, from scenes
no training, validation or evaluation uses, at the frame sizes it was trained on.

    python -m pipeline.tools.synth.calibration        # rewrites pipeline/assets/calibration/

Frames are stored no larger than the model's input (320 px on the long side): the model never sees more, and
the set stays small enough to ship inside the package.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2

from pipeline.tools.synth.world import SceneSpec, plan_scene, render_frame

CALIBRATION_SEED_BASE = 800_000  # between the validation seeds (below) and the evaluation seeds (900,000 on)
SIZES = ((640, 360), (480, 640), (640, 480), (360, 640), (512, 512), (800, 450), (416, 736), (320, 240))
LONG_SIDE = 320
_FRAMES_PER_SCENE = 12


def write_calibration_set(directory: Path, count: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("cal-*.jpg"):
        old.unlink()
    written = []
    for index in range(count):
        width, height = SIZES[index % len(SIZES)]
        spec = SceneSpec(width=width, height=height, n_frames=_FRAMES_PER_SCENE, seed=CALIBRATION_SEED_BASE + index)
        image, _ = render_frame(spec, (index * 5) % _FRAMES_PER_SCENE, plan_scene(spec))
        scale = LONG_SIDE / max(width, height)
        small = cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
        path = directory / f"cal-{index:03d}.jpg"
        if not cv2.imwrite(str(path), small, [cv2.IMWRITE_JPEG_QUALITY, 90]):
            raise OSError(f"cannot write {path}")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "assets" / "calibration")
    parser.add_argument("--count", type=int, default=128)
    args = parser.parse_args(argv)
    written = write_calibration_set(args.out, args.count)
    print(f"wrote {len(written)} calibration frames to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
