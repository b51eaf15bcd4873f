"""The small typed objects that travel between stages: a frame, a batch, a frame's result."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Union

import numpy as np
import numpy.typing as npt

from pipeline.ledger import NO_RUN, FrameTicket

if TYPE_CHECKING:
    import torch

Image = Union[npt.NDArray[np.uint8], "torch.Tensor"]
"""BGR uint8 (H, W, 3): a NumPy array, or a tensor on the GPU that decoded it (`decoder: cuda`)."""


def host_image(image: Image) -> npt.NDArray[np.uint8]:
    """The image in host memory, copied down only when it was decoded on a GPU."""
    if isinstance(image, np.ndarray):
        return image
    copied: npt.NDArray[np.uint8] = image.cpu().numpy()
    return copied


@dataclass(frozen=True)
class Frame:
    """One decoded image from one stream, stamped where it was read.

    `captured_at` is wall-clock UTC for the message; `captured_monotonic` measures latency and
    staleness without being fooled by clock changes. `run` is the run of the stream that read it (see
    `pipeline.ledger`): a stream removed and added again under its id (a reload's restart) still has frames
    in flight, and what becomes of them counts for the run that read them, not for the new one.
    """

    stream_id: str
    frame_id: int
    pts_ms: float | None
    captured_at: datetime
    captured_monotonic: float
    image: Image
    run: int = field(default=NO_RUN, compare=False)

    @property
    def ticket(self) -> FrameTicket:
        return FrameTicket(self.stream_id, self.run, self.frame_id)

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


@dataclass(frozen=True)
class Batch:
    """Frames inferred together; `formed_monotonic` is when the batcher released it."""

    frames: tuple[Frame, ...]
    formed_monotonic: float


@dataclass(frozen=True)
class Detections:
    """A frame's detections as parallel arrays, in source-frame pixels.

    Arrays rather than a list of small objects: the inference stage fills them in one vectorised step.
    `polygons[i]` is an (N, 2) float array or None when the model has no masks.
    """

    boxes_xyxy: npt.NDArray[np.float32]
    confidences: npt.NDArray[np.float32]
    class_ids: npt.NDArray[np.int64]
    polygons: tuple[npt.NDArray[np.float32] | None, ...] = ()
    track_ids: tuple[int | None, ...] = ()

    def __len__(self) -> int:
        return int(self.class_ids.shape[0])

    @staticmethod
    def empty() -> Detections:
        return Detections(
            boxes_xyxy=np.zeros((0, 4), np.float32),
            confidences=np.zeros(0, np.float32),
            class_ids=np.zeros(0, np.int64),
        )


@dataclass(frozen=True)
class Classification:
    class_id: int
    label: str
    confidence: float


@dataclass(frozen=True)
class BatchTimings:
    """Where a batch's time went in the inference stage, in seconds: letterboxing, the model alone, and NMS,
    masks and polygons. On a GPU the model's time is measured on the device; the others on the host."""

    preprocess_s: float
    infer_s: float
    postprocess_s: float


@dataclass(frozen=True)
class ZoneState:
    """A zone or line as a frame's message reports it: where it is, in source pixels, and its count now
    (tracked objects inside a zone; crossings of a line since the stream started)."""

    zone_id: str
    kind: str
    points: tuple[tuple[float, float], ...]
    count: int


@dataclass(frozen=True)
class FrameResult:
    """What the model said about one frame, with the timings the message reports (`inference_ms` is the
    model's own time on the frame's batch, without waiting for earlier batches)."""

    frame: Frame
    task: str
    detections: Detections
    labels: dict[int, str]
    classes: tuple[Classification, ...] = ()
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    inferred_monotonic: float = 0.0
    timings: BatchTimings | None = field(default=None, compare=False, repr=False)
    zones: tuple[ZoneState, ...] = ()
