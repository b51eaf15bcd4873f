"""INT8 on the CPU: OpenVINO's NNCF post-training quantization of the exported model, calibrated on frames
like the ones it will see.

Where the calibration frames come from (`model.calibration`):
- a folder of images, or a video clip, named by the config;
- by default, for the bundled model, the set shipped beside it (rendered by the synthetic world it was
  trained on, so `vap demo --set model.precision=int8` works offline);
- otherwise the first frames of the configured streams.

The quantized model is cached like any export, under a key that includes the calibration (`Int8Calibration.key`),
so new calibration data gives a new model and the same data reuses the old one. Calibration never falls back to
FP32 silently: frames that cannot be read are a config error naming `model.calibration`, and a quantization
that fails is a runtime error.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from pipeline.config import ModelConfig, redact_url
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

BUNDLED_SET = Path(__file__).resolve().parent.parent / "assets" / "calibration"
BUNDLED_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "vap-shapes-seg.pt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_STREAM_OPEN_TIMEOUT_MS = 10_000

Image = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Int8Calibration:
    """Calibration frames, read only when the cache does not already hold the quantized model."""

    key: str
    describe: str
    frames: Callable[[], list[Image]]


def calibration_for(model: ModelConfig, stream_urls: Sequence[str]) -> Int8Calibration:
    limit = model.calibration_frames
    if model.calibration is not None:
        source = Path(model.calibration)
        if source.is_dir():
            images = sorted(path for path in source.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise ConfigError([("model.calibration", f"{source} holds no images ({', '.join(IMAGE_SUFFIXES)})")])
            return Int8Calibration(_files_key(images[:limit]), f"{min(len(images), limit)} images in {source}",
                                   lambda: _read_images(images[:limit], "model.calibration"))
        if source.is_file():
            return Int8Calibration(_files_key([source]) + f"-{limit}", f"up to {limit} frames of {source}",
                                   lambda: _read_clip(str(source), limit, "model.calibration"))
        raise ConfigError([("model.calibration", f"not found: {source} (a folder of images or a video clip)")])
    if _is_bundled(model.weights) and BUNDLED_SET.is_dir():
        images = sorted(BUNDLED_SET.glob("*.jpg"))[:limit]
        return Int8Calibration(_files_key(images), f"the bundled model's {len(images)} calibration frames",
                               lambda: _read_images(images, "model.calibration"))
    if not stream_urls:
        raise ConfigError([("model.calibration", "int8 needs frames to calibrate on and there is no stream to take "
                                                 "them from; set it to a folder of images or a video clip")])
    key = hashlib.sha256("\n".join(sorted(stream_urls)).encode()).hexdigest()[:12] + f"-{limit}"
    return Int8Calibration(f"streams-{key}", f"the first {limit} frames of {len(stream_urls)} stream(s)",
                           lambda: _read_streams(stream_urls, limit))


def quantize_openvino(fp32_dir: Path, calibration: Int8Calibration, imgsz: int, target: Path) -> None:
    """Quantizes the OpenVINO export in `fp32_dir` into `target` (a model folder like Ultralytics' exports).
    The detection head stays in floating point, as Ultralytics' own INT8 export leaves it: its box decoding
    loses the most from 8 bits and costs the least time."""
    import nncf
    import openvino as ov  # type: ignore[import-untyped]

    frames = calibration.frames()
    log.info("quantizing to INT8 on %s (first run only; cached in %s)", calibration.describe, target.parent)
    started = time.monotonic()
    (xml,) = fp32_dir.glob("*.xml")
    model = ov.Core().read_model(str(xml))
    prepared = [_model_input(frame, imgsz) for frame in frames]
    dataset = nncf.Dataset(_WithProgress(prepared))
    quantized = nncf.quantize(model, dataset, preset=nncf.QuantizationPreset.MIXED, subset_size=len(prepared),
                              ignored_scope=_detection_head(model))
    target.mkdir(parents=True)
    ov.save_model(quantized, str(target / xml.name))
    for extra in fp32_dir.iterdir():
        if extra.suffix not in (".xml", ".bin"):
            shutil.copy2(extra, target / extra.name)
    log.info("INT8 model ready in %.1f s", time.monotonic() - started)


class _WithProgress:
    """The calibration inputs, logging every tenth as NNCF reads them (quantizing takes a minute or more on a
    small CPU). Iterable more than once: NNCF may pass over the data again."""

    def __init__(self, items: list[Any]) -> None:
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Any:
        step = max(1, len(self._items) // 10)
        for index, item in enumerate(self._items, 1):
            if index % step == 0 or index == len(self._items):
                log.info("calibrating: %d/%d frames", index, len(self._items))
            yield item


def _model_input(frame: Image, imgsz: int) -> npt.NDArray[np.float32]:
    """The same letterbox the pipeline feeds the model (`HostLetterbox`), one frame at a time."""
    import torch

    from pipeline.inference.preprocess import HostLetterbox, plan_batch

    plan = plan_batch([frame], imgsz, 32, rect=True)
    tensor: npt.NDArray[np.float32] = HostLetterbox()([frame], plan, torch.float32).numpy()
    return tensor


def _detection_head(model: Any) -> Any:
    import nncf

    operations = model.get_ordered_ops()
    sigmoids = [op.get_friendly_name() for op in operations if op.get_type_name() == "Sigmoid"]
    if not sigmoids:
        return None
    head = sigmoids[-1].split("/", 1)[0]
    return nncf.IgnoredScope(names=[
        op.get_friendly_name() for op in operations
        if op.get_type_name() == "Sigmoid" or op.get_friendly_name().startswith((f"{head}/", f"{head}.dfl"))
    ], validate=False)


def _is_bundled(weights: str) -> bool:
    path = Path(weights)
    return path.is_file() and BUNDLED_WEIGHTS.is_file() and path.resolve() == BUNDLED_WEIGHTS


def _files_key(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def _read_images(paths: Sequence[Path], key: str) -> list[Image]:
    frames = []
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise ConfigError([(key, f"cannot read the image {path}")])
        frames.append(image)
    return frames


def _read_clip(url: str, limit: int, key: str) -> list[Image]:
    frames = _read_frames(url, limit)
    if not frames:
        raise ConfigError([(key, f"no frame could be read from {url}")])
    return frames


def _read_streams(urls: Sequence[str], limit: int) -> list[Image]:
    per_stream = max(1, limit // len(urls))
    frames: list[Image] = []
    for url in urls:
        taken = _read_frames(url, per_stream)
        log.info("calibration: %d frame(s) from %s", len(taken), redact_url(url))
        frames += taken
    if not frames:
        raise ConfigError([("model.calibration", "no stream gave a frame to calibrate on; set it to a folder of "
                                                 "images or a video clip")])
    return frames


def _read_frames(url: str, limit: int) -> list[Image]:
    capture = cv2.VideoCapture(url, cv2.CAP_ANY, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, _STREAM_OPEN_TIMEOUT_MS])
    frames: list[Image] = []
    try:
        while len(frames) < limit:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(frame)
    finally:
        capture.release()
    return frames

