"""The small typed objects that travel between stages: a frame, a batch, a frame's result; and detections as a few
arrays, as the pipeline and its worker processes (`pipeline.children`) pass them to each other."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Union

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


def split_points(points: npt.NDArray[np.float32], lengths: Sequence[int]) -> list[npt.NDArray[np.float32]]:
    """Outlines stored one after another in `points`, `lengths[i]` points each, as views; none for no lengths."""
    ends = np.cumsum(lengths, dtype=np.int64).tolist()
    return [points[start:end] for start, end in zip([0, *ends][:-1], ends, strict=True)]


def frame_groups(detections_per_frame: Sequence[int] | npt.NDArray[np.int64], groups: int) -> list[tuple[int, int]]:
    """Runs of whole frames, (first, end), at most `groups` of them, with about as many detections each: a
    batch's frames go to the workers in order, so their answers simply follow one another. In plain Python: for
    a batch's few dozen frames, NumPy's calls cost more than the work."""
    counts = detections_per_frame.tolist() if isinstance(detections_per_frame, np.ndarray) else detections_per_frame
    frames = len(counts)
    if frames == 0:
        return []
    running = list(itertools.accumulate(counts))
    total = running[-1]
    if total == 0 or groups <= 1:
        return [(0, frames)]
    edges = {0, frames}
    for group in range(1, groups):
        target = total * group / groups
        reaching = bisect.bisect_left(running, target) + 1  # the first run of frames that gets there
        short = reaching - 1
        closer = short > 0 and target - running[short - 1] < running[reaching - 1] - target
        edges.add(short if closer else reaching)
    ordered = sorted(edge for edge in edges if 0 <= edge <= frames)
    return list(itertools.pairwise(ordered))


PackedDetections = tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.int64],
                npt.NDArray[np.int64], npt.NDArray[np.float32]]


def pack_detections(frames: list[Detections]) -> PackedDetections:
    """Frames' detections as six arrays, whatever their number: a list of them pickles every small array on its
    own, and on the finisher thread unpickling that took 170-200 us for 16 frames with 44 masks, against 60-110
    us for these arrays and the views made from them. A detection without an outline has length -1."""
    every = [polygon for detections in frames for polygon in detections.polygons]
    polygons = [polygon for polygon in every if polygon is not None]
    return (np.array([[len(detections), len(detections.polygons)] for detections in frames], np.int64).reshape(-1, 2),
            np.concatenate([detections.boxes_xyxy for detections in frames] or [np.zeros((0, 4), np.float32)]),
            np.concatenate([detections.confidences for detections in frames] or [np.zeros(0, np.float32)]),
            np.concatenate([detections.class_ids for detections in frames] or [np.zeros(0, np.int64)]),
            np.array([-1 if polygon is None else len(polygon) for polygon in every], np.int64),
            np.concatenate(polygons or [np.zeros((0, 2), np.float32)]))


def detections_to_bytes(detections: Detections) -> tuple[bytes, bytes, bytes, list[int], bytes]:
    """One frame's detections for a request of its own: bytes pickle as one copy, where each array costs 4-5 us
    (`pack_detections` is for many frames at once). A detection without an outline has length -1."""
    outlines = [polygon for polygon in detections.polygons if polygon is not None]
    return (detections.boxes_xyxy.astype(np.float32, copy=False).tobytes(),
            detections.confidences.astype(np.float32, copy=False).tobytes(),
            detections.class_ids.astype(np.int64, copy=False).tobytes(),
            [-1 if polygon is None else len(polygon) for polygon in detections.polygons],
            np.concatenate(outlines).astype(np.float32, copy=False).tobytes() if outlines else b"")


def detections_from_bytes(boxes: bytes, confidences: bytes, class_ids: bytes, lengths: list[int],
                          points: bytes) -> Detections:
    return Detections(np.frombuffer(boxes, np.float32).reshape(-1, 4), np.frombuffer(confidences, np.float32),
                      np.frombuffer(class_ids, np.int64),
                      tuple(_outlines(np.frombuffer(points, np.float32).reshape(-1, 2), lengths)))


def _outlines(points: npt.NDArray[np.float32], lengths: list[int]) -> list[npt.NDArray[np.float32] | None]:
    """Outlines stored one after another, as views; None where the length is -1 (a detection without one)."""
    outlines: list[npt.NDArray[np.float32] | None] = list(split_points(points, [max(size, 0) for size in lengths]))
    if min(lengths, default=0) < 0:
        outlines = [None if size < 0 else outline for size, outline in zip(lengths, outlines, strict=True)]
    return outlines


def unpack_detections(packed: Sequence[Any]) -> list[Detections]:
    counts, boxes, confidences, class_ids, lengths, points = packed
    outlines = _outlines(points, lengths.tolist())
    row_ends, outline_ends = np.cumsum(counts, 0).T.tolist()
    frames = []
    row_start = outline_start = 0
    for row_end, outline_end in zip(row_ends, outline_ends, strict=True):
        if row_end == row_start:
            frames.append(Detections.empty())
        else:
            frames.append(Detections(boxes[row_start:row_end], confidences[row_start:row_end],
                                     class_ids[row_start:row_end], tuple(outlines[outline_start:outline_end])))
        row_start, outline_start = row_end, outline_end
    return frames
