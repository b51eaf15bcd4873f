"""Letterboxing a batch of camera frames into one model input tensor.

Two implementations with the same geometry as Ultralytics' `LetterBox`, so boxes and masks map back
exactly as `YOLO.predict` maps them:
- on a GPU, the frames are copied to the device once as uint8 (through pinned staging buffers) and
  resized, padded, colour-swapped and normalised there in batch; the host does no per-pixel work;
- on a CPU, OpenCV's uint8 resize is several times faster than any float path, so the host letterboxes
  straight into one preallocated batch array.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import numpy.typing as npt

from pipeline.frames import Image, host_image

if TYPE_CHECKING:
    import torch

PAD_VALUE = 114


@dataclass(frozen=True)
class Letterbox:
    """Where one source frame sits inside the model input: scaled to `resized_hw`, offset by (top, left)."""

    source_hw: tuple[int, int]
    input_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    top: int
    left: int

    @property
    def gain_xy(self) -> tuple[float, float]:
        return self.resized_hw[1] / self.source_hw[1], self.resized_hw[0] / self.source_hw[0]


def input_shape(source_shapes: Sequence[tuple[int, int]], imgsz: int, stride: int, rect: bool) -> tuple[int, int]:
    """The model input (H, W) for a batch: the smallest stride-aligned rectangle when every frame has the
    same shape and the runtime accepts any shape, else the `imgsz` square (as Ultralytics does)."""
    if not rect or len(set(source_shapes)) != 1:
        return imgsz, imgsz
    height, width = source_shapes[0]
    gain = min(imgsz / height, imgsz / width)
    resized_h, resized_w = max(round(height * gain), 1), max(round(width * gain), 1)
    return resized_h + (imgsz - resized_h) % stride, resized_w + (imgsz - resized_w) % stride


def letterbox(source_hw: tuple[int, int], input_hw: tuple[int, int]) -> Letterbox:
    height, width = source_hw
    gain = min(input_hw[0] / height, input_hw[1] / width)
    resized_h, resized_w = max(round(height * gain), 1), max(round(width * gain), 1)
    top = round((input_hw[0] - resized_h) / 2 - 0.1)
    left = round((input_hw[1] - resized_w) / 2 - 0.1)
    return Letterbox(source_hw, input_hw, (resized_h, resized_w), top, left)


def plan_batch(images: Sequence[Image], imgsz: int, stride: int, rect: bool) -> list[Letterbox]:
    shapes = [(int(image.shape[0]), int(image.shape[1])) for image in images]
    target = input_shape(shapes, imgsz, stride, rect)
    return [letterbox(shape, target) for shape in shapes]


def default_copy_threads() -> int:
    """A quarter of the cores, at most four: enough to reach host memory bandwidth while leaving the other
    cores to the stream decoders."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


class HostLetterbox:
    """CPU path: OpenCV resize into a reused uint8 batch buffer, then one conversion to float."""

    def __init__(self) -> None:
        self._buffer: npt.NDArray[np.uint8] = np.zeros((0, 0, 0, 3), np.uint8)

    def __call__(self, images: Sequence[Image], plan: Sequence[Letterbox], dtype: torch.dtype) -> torch.Tensor:
        import torch

        batch = self.uint8(images, plan)
        # Reorder while still uint8 (BGR->RGB, HWC->CHW): a quarter of the bytes a float reorder moves.
        planar = np.ascontiguousarray(batch[..., ::-1].transpose(0, 3, 1, 2))
        return torch.from_numpy(planar).to(dtype).div_(255)

    def uint8(self, images: Sequence[Image], plan: Sequence[Letterbox]) -> npt.NDArray[np.uint8]:
        """The letterboxed batch as OpenCV gives it, uint8 BGR in NHWC, for a model that converts it itself.
        The buffer is reused: it holds this batch until the next call."""
        height, width = plan[0].input_hw
        shape = (len(images), height, width, 3)
        if self._buffer.shape != shape:
            self._buffer = np.empty(shape, np.uint8)
        batch = self._buffer
        batch.fill(PAD_VALUE)
        for index, (decoded, box) in enumerate(zip(images, plan, strict=True)):
            image = host_image(decoded)
            resized_h, resized_w = box.resized_hw
            target = batch[index, box.top:box.top + resized_h, box.left:box.left + resized_w]
            if (resized_h, resized_w) == box.source_hw:
                target[...] = image
            else:
                cv2.resize(image, (resized_w, resized_h), dst=target, interpolation=cv2.INTER_LINEAR)
        return batch


class DeviceLetterbox:
    """GPU path: uint8 frames go up once through pinned memory; everything else happens on the device.

    Copying a batch of 1080p frames into pinned memory moves about 200 MB, which one thread does at host
    memory speed in tens of milliseconds, the longest step of a batch. A few copy threads share it (NumPy
    releases the GIL while copying), and two staging buffers alternate, so a batch never waits for the
    previous one's upload. The copy threads only work while a call waits for them, so the inference
    thread's heartbeat covers them.
    """

    def __init__(self, device: str, copy_threads: int | None = None) -> None:
        import torch

        self._device = torch.device(device)
        self._pin = self._device.type == "cuda"
        threads = copy_threads if copy_threads is not None else default_copy_threads()
        self._copier = ThreadPoolExecutor(threads, thread_name_prefix="upload-copy") if threads > 1 else None
        self._staging: list[torch.Tensor | None] = [None, None]
        self._uploaded: list[Any] = [None, None]
        self._turn = 0

    def close(self) -> None:
        if self._copier is not None:
            self._copier.shutdown(wait=True)

    def _upload(self, images: Sequence[Image]) -> torch.Tensor | list[torch.Tensor]:
        """One host-to-device copy per batch when frames share a shape (the usual case; the batch comes back
        as one tensor), else one per frame. Frames a GPU decoded are already tensors and skip the copy."""
        import torch

        first = tuple(images[0].shape)
        same_shape = all(tuple(image.shape) == first for image in images)
        host_images = [image for image in images if isinstance(image, np.ndarray)]
        if len(host_images) < len(images) or not same_shape:
            on_device = [self._on_device(image) for image in images]
            return torch.stack(on_device) if same_shape else on_device
        shape = (len(images), *first)
        turn = self._turn
        self._turn = 1 - turn
        if self._uploaded[turn] is not None:
            self._uploaded[turn].synchronize()
        staging = self._staging[turn]
        if staging is None or staging.shape != shape:
            staging = self._staging[turn] = torch.empty(shape, dtype=torch.uint8, pin_memory=self._pin)
        copy_each = map if self._copier is None else self._copier.map
        for _ in copy_each(np.copyto, staging.numpy(), host_images):
            pass
        uploaded = staging.to(self._device, non_blocking=self._pin)
        if self._pin:
            self._uploaded[turn] = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._uploaded[turn].record(torch.cuda.current_stream(self._device))  # the copy's device, not cuda:0
        return uploaded

    def _on_device(self, image: Image) -> torch.Tensor:
        """No torch call for a frame already here: each one hands the GIL back and must win it again from
        busy threads. Its reader synchronised it, and it is released only after the finisher has waited for
        this batch's device work, so no stream bookkeeping is needed either."""
        import torch

        if isinstance(image, np.ndarray):
            return torch.from_numpy(image).to(self._device)
        return image if image.device == self._device else image.to(self._device)

    def __call__(self, images: Sequence[Image], plan: Sequence[Letterbox],
                 dtype: torch.dtype) -> torch.Tensor:
        import torch
        import torch.nn.functional as functional

        height, width = plan[0].input_hw
        batch = torch.full((len(images), 3, height, width), PAD_VALUE / 255, dtype=dtype, device=self._device)
        uploaded = self._upload(images)
        groups: dict[tuple[tuple[int, int], tuple[int, int], int, int], list[int]] = {}
        for index, box in enumerate(plan):
            groups.setdefault((box.source_hw, box.resized_hw, box.top, box.left), []).append(index)
        for (source_hw, resized_hw, top, left), indices in groups.items():
            # One uploaded tensor means every frame shares a shape, so this is the only group.
            frames = uploaded if isinstance(uploaded, torch.Tensor) else torch.stack([uploaded[i] for i in indices])
            frames = frames.permute(0, 3, 1, 2).flip(1).to(dtype)
            if resized_hw != source_hw:
                frames = functional.interpolate(frames, size=resized_hw, mode="bilinear", align_corners=False)
            frames = frames.div_(255)
            rows, cols = slice(top, top + resized_hw[0]), slice(left, left + resized_hw[1])
            if len(indices) == len(images):
                batch[:, :, rows, cols] = frames
            else:
                for position, index in enumerate(indices):
                    batch[index, :, rows, cols] = frames[position]
        return batch
