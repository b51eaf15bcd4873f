"""NMS, box rescaling and mask assembly for a whole batch at once, on the model's device.

Ultralytics' own post-processing loops over the images of a batch and issues a dozen small device
operations for each. At batch 32 on a GPU that is hundreds of kernel launches, each needing the GIL,
and on a host busy decoding 16 cameras every one of them waits. Here the whole batch takes a fixed
handful of operations: one candidate filter, one NMS over all images (boxes of different images and
classes are offset so they never overlap, as Ultralytics does per image; split into a few calls only when
a very low `conf` leaves tens of thousands of candidates), one mask product and, on a GPU, one upsample.
The results match `YOLO.predict`'s (the tests compare them). Polygons are traced on the host, one box-sized
crop per mask; on the CPU each mask is upsampled only there, as its polygon is traced.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import numpy.typing as npt

from pipeline.frames import Detections, split_points
from pipeline.inference.preprocess import Letterbox

if TYPE_CHECKING:
    import torch

_MAX_NMS_CANDIDATES = 30_000
_MASK_PIXELS_AT_ONCE = 1 << 28  # a gigabyte of float32


@dataclass(frozen=True)
class BatchDetections:
    """All detections of a batch, grouped by image and sorted by score within it.

    `rows` are (x1, y1, x2, y2, confidence, class) in source-frame pixels. A segmentation model's masks come
    one of two ways, one per row: `masks`, binary at model-input size (built on a GPU), or `mask_logits` at
    prototype resolution with `mask_boxes`, the rows' boxes in model-input pixels (on the CPU, where each
    mask is upsampled only inside its box when its polygon is traced). Both are None for a detection model.
    A GPU's masks leave the device as `mask_windows` and `mask_pixels` instead (`pack_mask_windows`).
    """

    rows: torch.Tensor
    image_index: torch.Tensor
    masks: torch.Tensor | None
    mask_logits: torch.Tensor | None = None
    mask_boxes: torch.Tensor | None = None
    mask_windows: torch.Tensor | None = None
    mask_pixels: torch.Tensor | None = None

    def to_host(self) -> BatchDetections:
        """Every tensor copied to the host without waiting: the caller records an event to wait on."""
        def moved(value: torch.Tensor | None) -> Any:
            return None if value is None else value.to("cpu", non_blocking=True)

        return BatchDetections(moved(self.rows), moved(self.image_index), moved(self.masks), moved(self.mask_logits),
                               moved(self.mask_boxes), moved(self.mask_windows), moved(self.mask_pixels))


def batched_nms(
    prediction: torch.Tensor, num_classes: int, conf: float, iou: float, classes: Sequence[int] | None,
    agnostic: bool, input_hw: tuple[int, int], max_det: int = 300,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw YOLO output (B, 4 + classes + extra, anchors) -> kept rows (N, 6 + extra) and their image index.

    Rows are x1, y1, x2, y2 (model input pixels), confidence, class, then the extra channels (mask
    coefficients), ordered by image and, within an image, by falling confidence. As in Ultralytics, each
    image keeps at most `max_det` rows and offers NMS at most 30,000 candidates: caps over the whole batch
    would let one busy image starve the others, and every row kept here costs a full-size mask later.
    """
    import torch
    from ultralytics.utils.ops import xywh2xyxy

    candidates = prediction.transpose(1, 2)
    scores, labels = candidates[..., 4:4 + num_classes].max(-1)
    keep = scores > conf
    if classes is not None:
        keep &= torch.isin(labels, torch.as_tensor(list(classes), dtype=labels.dtype, device=labels.device))
    image, anchor = keep.nonzero(as_tuple=True)
    score = scores[image, anchor]
    chunks = [image.numel()]
    if image.numel() > _MAX_NMS_CANDIDATES:  # only with a very low `conf`; a sort and one sync are cheap then
        best = _best_per_image(image, score, _MAX_NMS_CANDIDATES)
        image, anchor, score = image[best], anchor[best], score[best]
        chunks = _whole_image_chunks(torch.bincount(image, minlength=prediction.shape[0]).tolist())
    found = candidates[image, anchor].float()
    boxes = xywh2xyxy(found[:, :4])
    score = score.float()
    label = labels[image, anchor]
    group = image if agnostic else image * num_classes + label
    kept = _offset_nms(boxes, score, group, iou, 4.0 * max(input_hw), chunks)
    kept = kept[torch.argsort(image[kept], stable=True)]
    kept = kept[_rank_within_groups(image[kept]) < max_det]
    rows = torch.cat([boxes[kept], score[kept, None], label[kept, None].float(), found[kept, 4 + num_classes:]], 1)
    return rows, image[kept]


def _offset_nms(boxes: torch.Tensor, score: torch.Tensor, group: torch.Tensor, iou: float, spacing: float,
                chunks: Sequence[int]) -> torch.Tensor:
    """Indices NMS keeps, by falling score within each chunk of consecutive rows. Boxes of different groups
    are moved apart so they never overlap, so one call serves every (image, class) group; the rows come in
    chunks of whole images because the GPU kernel's work and memory grow with the square of its input
    (a batch of 32 with `conf: 0` would need gigabytes in one call)."""
    import torch
    import torchvision

    # float64: offsets for hundreds of (image, class) groups would cost float32 its sub-pixel precision
    offset_boxes = boxes.double() + group.double()[:, None] * spacing
    scores = score.double()
    kept = []
    start = 0
    for size in chunks:
        kept.append(torchvision.ops.nms(offset_boxes[start:start + size], scores[start:start + size], iou) + start)
        start += size
    return kept[0] if len(kept) == 1 else torch.cat(kept)


def _whole_image_chunks(counts: Sequence[int]) -> list[int]:
    """Row counts of consecutive images grouped so that no group passes the candidate cap."""
    chunks = [0]
    for count in counts:
        if chunks[-1] and chunks[-1] + count > _MAX_NMS_CANDIDATES:
            chunks.append(0)
        chunks[-1] += count
    return chunks


def _best_per_image(image: torch.Tensor, score: torch.Tensor, limit: int) -> torch.Tensor:
    """Indices of each image's `limit` highest scores, grouped by image in order, on the device."""
    import torch

    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(image[order], stable=True)]
    return order[_rank_within_groups(image[order]) < limit]


def _rank_within_groups(groups: torch.Tensor) -> torch.Tensor:
    """Each element's position within its run of equal values, for sorted `groups`, without a host sync."""
    import torch

    positions = torch.arange(groups.numel(), device=groups.device)
    starts = torch.ones_like(groups, dtype=torch.bool)
    starts[1:] = groups[1:] != groups[:-1]
    return positions - torch.where(starts, positions, 0).cummax(0).values


def assemble(rows: torch.Tensor, image_index: torch.Tensor, plan: Sequence[Letterbox],
             protos: torch.Tensor | None, full_masks: bool = True) -> BatchDetections:
    """Masks from prototypes (when the model has them) and boxes mapped back to each source frame.

    `full_masks: False` stops at each row's mask logits at prototype resolution: on the CPU, upsampling every
    mask to the whole input and cropping it to its box took 4 ms of a batch of 4 at 320 px, a quarter of
    the host's work per frame beside an INT8 model, for pixels that are nearly all outside the box."""
    import torch

    boxes = rows[:, :4]
    masks = mask_logits = None
    if protos is not None:
        input_hw = plan[0].input_hw
        channels, proto_h, proto_w = protos.shape[1:]
        count = rows.shape[0]
        if count:
            # Each image's detections against that image's prototypes, in one bmm over a (image, detection)
            # grid padded to the busiest image: gathering the prototypes per detection instead copies 32
            # times more memory, the slowest step on a CPU.
            batch = protos.shape[0]
            counts = torch.bincount(image_index, minlength=batch)
            position = torch.arange(count, device=rows.device) - (torch.cumsum(counts, 0) - counts)[image_index]
            grid = rows.new_zeros((batch, int(counts.max()), channels))
            grid[image_index, position] = rows[:, 6:6 + channels]
            products = torch.bmm(grid, protos.float().view(batch, channels, proto_h * proto_w))
            logits = products[image_index, position].view(count, 1, proto_h, proto_w)
            if full_masks:
                masks = _binary_masks(logits, boxes, input_hw)
            else:
                mask_logits = logits[:, 0]
        elif full_masks:
            masks = torch.zeros((0, *input_hw), dtype=torch.uint8, device=rows.device)
        else:
            mask_logits = torch.zeros((0, proto_h, proto_w), device=rows.device)
    geometry = torch.tensor(
        [[box.left, box.top] * 2 + [*box.gain_xy] * 2 + [box.source_hw[1], box.source_hw[0]] * 2 for box in plan],
        dtype=torch.float32,
    ).to(rows.device, non_blocking=True)[image_index]
    offset, gain, limit = geometry[:, 0:4], geometry[:, 4:8], geometry[:, 8:12]
    scaled = ((boxes - offset) / gain).clamp(min=0).minimum(limit)
    return BatchDetections(torch.cat([scaled, rows[:, 4:6]], 1), image_index, masks, mask_logits,
                           None if mask_logits is None else boxes)


def _binary_masks(raw: torch.Tensor, boxes: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
    """Prototype-resolution mask logits -> binary masks at input size, cropped to their boxes. On the way each
    mask is float32 at input size (1.6 MB at 640 px); with `conf: 0` a batch keeps up to 300 rows per image, so
    they are built a bounded number at a time, usually all in one go."""
    import torch
    import torch.nn.functional as functional
    from ultralytics.utils.ops import crop_mask

    def build(part: slice) -> torch.Tensor:
        upsampled = functional.interpolate(raw[part], input_hw, mode="bilinear")[:, 0]
        cropped: torch.Tensor = crop_mask(upsampled.gt_(0.0).byte(), boxes[part])
        return cropped

    count = raw.shape[0]
    at_once = max(1, _MASK_PIXELS_AT_ONCE // (input_hw[0] * input_hw[1]))
    if count <= at_once:
        return build(slice(None))
    masks = torch.empty((count, *input_hw), dtype=torch.uint8, device=raw.device)
    for start in range(0, count, at_once):
        part = slice(start, start + at_once)
        masks[part] = build(part)
    return masks


def mask_polygons(masks: npt.NDArray[np.uint8], boxes_xyxy: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
    """Each binary mask's outline, exactly as Ultralytics' `masks2segments` finds it, in mask pixels; an empty
    (0, 2) array for a mask with no pixel set.

    A mask is zero outside its box, so contours are traced on the box (with a margin) rather than on the
    whole input, usually a hundred times fewer pixels; OpenCV's `offset` puts the points back in place.
    """
    height, width = masks.shape[1:]
    return [_outline(mask[top:bottom, left:right], left, top)
            for mask, (left, top, right, bottom) in zip(masks, _trace_windows(boxes_xyxy, height, width), strict=True)]


def _trace_windows(boxes_xyxy: npt.NDArray[np.float32], height: int | npt.NDArray[np.int64],
                   width: int | npt.NDArray[np.int64]) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of each box with a 2-pixel margin, within a height x width mask (one size
    for all boxes, or one per box)."""
    boxes = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
    lefts = np.clip(np.floor(boxes[:, 0]).astype(np.int64) - 2, 0, width).tolist()
    tops = np.clip(np.floor(boxes[:, 1]).astype(np.int64) - 2, 0, height).tolist()
    rights = np.minimum(np.ceil(boxes[:, 2]).astype(np.int64) + 2, width).tolist()
    bottoms = np.minimum(np.ceil(boxes[:, 3]).astype(np.int64) + 2, height).tolist()
    return list(zip(lefts, tops, rights, bottoms, strict=True))


def _outline(window: npt.NDArray[np.uint8], left: int, top: int) -> npt.NDArray[np.float32]:
    from ultralytics.data.converter import merge_multi_segment

    contours: Any = ()
    if window.size:
        contours = cv2.findContours(window, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(left, top))[0]
    if not contours:
        return np.zeros((0, 2), np.float32)
    if len(contours) == 1:
        points: npt.NDArray[np.float32] = contours[0].reshape(-1, 2).astype(np.float32)
        return points
    merged = merge_multi_segment([contour.reshape(-1, 2) for contour in contours])
    return np.concatenate(merged).astype(np.float32)


class BoxUpsampler:
    """Mask logits at prototype resolution upsampled to model-input pixels one window at a time, with the taps,
    weights and order of operations of torch's `interpolate(mode="bilinear", align_corners=False)` over the
    whole mask: the same values, for only the pixels a box covers."""

    def __init__(self, proto_hw: tuple[int, int], input_hw: tuple[int, int]) -> None:
        self._rows = _bilinear_taps(proto_hw[0], input_hw[0])
        self._cols = _bilinear_taps(proto_hw[1], input_hw[1])

    def window(self, logits: npt.NDArray[np.float32], top: int, bottom: int, left: int,
               right: int) -> npt.NDArray[np.float32]:
        low_y, high_y, weight_low_y, weight_high_y = (taps[top:bottom] for taps in self._rows)
        low_x, high_x, weight_low_x, weight_high_x = (taps[left:right] for taps in self._cols)
        first = int(low_y[0])
        rows = logits[first:int(high_y[-1]) + 1]
        across = rows[:, low_x] * weight_low_x + rows[:, high_x] * weight_high_x
        upsampled: npt.NDArray[np.float32] = (across[low_y - first] * weight_low_y[:, None]
                                              + across[high_y - first] * weight_high_y[:, None])
        return upsampled


def _bilinear_taps(source: int, target: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp],
                                                       npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """For each target pixel along one axis: its two source pixels and their weights (half-pixel centres,
    clamped at the edges)."""
    position = np.float32(source / target) * (np.arange(target, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    position = np.maximum(position, np.float32(0))
    low = np.minimum(np.floor(position).astype(np.intp), source - 1)
    high = np.minimum(low + 1, source - 1)
    weight_high = np.clip(position - low, 0, 1).astype(np.float32)
    return low, high, (np.float32(1) - weight_high).astype(np.float32), weight_high


def polygons_from_logits(upsampler: BoxUpsampler, logits: npt.NDArray[np.float32], input_boxes: npt.NDArray[np.float32],
                         boxes_xyxy: npt.NDArray[np.float32], visible: Letterbox) -> list[npt.NDArray[np.float32]]:
    """What `mask_polygons` gives for the visible part of the full masks (`boxes_xyxy` in its pixels), built
    from each row's logits only inside its box. A pixel is set where the upsampled logit is positive and the
    pixel lies in its box in input pixels (x1 <= x < x2, as Ultralytics' crop keeps it)."""
    height, width = visible.resized_hw
    polygons = []
    for logit, box, (left, top, right, bottom) in zip(logits, input_boxes.tolist(),
                                                      _trace_windows(boxes_xyxy, height, width), strict=True):
        window = np.zeros((max(0, bottom - top), max(0, right - left)), np.uint8)
        corner_y, corner_x = top + visible.top, left + visible.left  # the window's corner in input pixels
        y_from, y_to = max(math.ceil(box[1]), corner_y), min(math.ceil(box[3]), corner_y + window.shape[0])
        x_from, x_to = max(math.ceil(box[0]), corner_x), min(math.ceil(box[2]), corner_x + window.shape[1])
        if y_to > y_from and x_to > x_from:
            inside = window[y_from - corner_y:y_to - corner_y, x_from - corner_x:x_to - corner_x]
            np.greater(upsampler.window(logit, y_from, y_to, x_from, x_to), 0, out=inside, casting="unsafe")
        polygons.append(_outline(window, left, top))
    return polygons


def window_bounds(windows: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Where each packed window's pixels start in `mask_pixels` (windows as (left, top, right, bottom) rows), and
    where the last one's end: one more entry than windows."""
    areas = np.maximum(windows[:, 2] - windows[:, 0], 0) * np.maximum(windows[:, 3] - windows[:, 1], 0)
    return np.concatenate([np.zeros(1, np.int64), np.cumsum(areas)])


def pack_mask_windows(found: BatchDetections, plan: Sequence[Letterbox]) -> BatchDetections:
    """On a GPU: only the pixels that polygons are traced from leave the device, each mask's window around its
    box (`_trace_windows`, as `frame_detections` crops it), packed one after another. A whole mask at 640 px is
    0.4 MB, so a batch with a hundred detections copied forty megabytes to freshly allocated host memory for
    windows that are usually a few percent of it. `mask_windows` holds (left, top, right, bottom) in each
    frame's visible pixels; `mask_pixels` the windows' pixels, row by row."""
    import torch

    masks = found.masks
    if masks is None:
        return found
    image_index = found.image_index.cpu().numpy()  # waits for the device, as NMS and the mask product have
    gains = np.array([box.gain_xy for box in plan], np.float32)[image_index]
    visible = found.rows[:, :4].cpu().numpy() * np.tile(gains, 2)  # the float32 product frame_detections takes
    sizes = np.array([box.resized_hw for box in plan], np.int64).reshape(-1, 2)[image_index]
    windows = np.array(_trace_windows(visible, sizes[:, 0], sizes[:, 1]), np.int64).reshape(-1, 4)
    corners = np.array([(box.left, box.top) for box in plan], np.int64).reshape(-1, 2)[image_index] + windows[:, :2]
    widths = np.maximum(windows[:, 2] - windows[:, 0], 0)
    bounds = window_bounds(windows)
    areas, total = np.diff(bounds), int(bounds[-1])

    def on_device(values: npt.NDArray[np.int64]) -> torch.Tensor:
        return torch.from_numpy(values).to(masks.device, non_blocking=True)

    owner = torch.repeat_interleave(torch.arange(len(areas), device=masks.device), on_device(areas),
                                    output_size=total)
    within = torch.arange(total, device=masks.device) - on_device(bounds[:-1])[owner]
    row_width = on_device(widths)[owner]
    ys = on_device(np.ascontiguousarray(corners[:, 1]))[owner] + torch.div(within, row_width, rounding_mode="floor")
    xs = on_device(np.ascontiguousarray(corners[:, 0]))[owner] + within % row_width
    return BatchDetections(found.rows, found.image_index, None, mask_windows=torch.from_numpy(windows),
                           mask_pixels=masks[owner, ys, xs])


_Tracer = Callable[[int, int, Letterbox, npt.NDArray[np.float32]], list[npt.NDArray[np.float32]]]


def _mask_tracer(found_in_batch: BatchDetections, plan: Sequence[Letterbox]) -> _Tracer | None:
    """How the outlines of rows `start:end` (one frame's, boxes given in its visible part's pixels) are traced:
    from the windows a GPU packed, from whole masks, or from logits upsampled inside each box (the CPU's); None
    without masks."""
    if found_in_batch.mask_windows is not None and found_in_batch.mask_pixels is not None:
        packed, pixels = found_in_batch.mask_windows.numpy(), found_in_batch.mask_pixels.numpy()
        windows, starts = packed.tolist(), window_bounds(packed).tolist()
        shapes = [(max(bottom - top, 0), max(right - left, 0)) for left, top, right, bottom in windows]

        def from_windows(start: int, end: int, box: Letterbox,
                         boxes: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
            return [_outline(pixels[starts[row]:starts[row + 1]].reshape(shapes[row]), *windows[row][:2])
                    for row in range(start, end)]

        return from_windows
    if found_in_batch.masks is not None:
        masks = found_in_batch.masks.numpy()

        def from_masks(start: int, end: int, box: Letterbox,
                       boxes: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
            resized_h, resized_w = box.resized_hw
            return mask_polygons(masks[start:end, box.top:box.top + resized_h, box.left:box.left + resized_w], boxes)

        return from_masks
    if found_in_batch.mask_logits is not None and found_in_batch.mask_boxes is not None and plan:
        logits, input_boxes = found_in_batch.mask_logits.numpy(), found_in_batch.mask_boxes.numpy()
        upsampler = BoxUpsampler(logits.shape[1:], plan[0].input_hw)

        def from_logits(start: int, end: int, box: Letterbox,
                        boxes: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
            return polygons_from_logits(upsampler, logits[start:end], input_boxes[start:end], boxes, box)

        return from_logits
    return None


def frame_detections(found_in_batch: BatchDetections, plan: Sequence[Letterbox]) -> list[Detections]:
    """Each frame's detections in its own pixels, from a batch's results on the host: boxes as they are, masks
    turned into polygons scaled back to the source frame and clipped to it."""
    rows = found_in_batch.rows.numpy()
    image_index = found_in_batch.image_index.numpy()
    trace = _mask_tracer(found_in_batch, plan)
    bounds = np.searchsorted(image_index, np.arange(len(plan) + 1)).tolist()
    outlines = None if trace is None or not len(rows) else _source_outlines(trace, rows, image_index, bounds, plan)
    out: list[Detections] = []
    for index in range(len(plan)):
        start, end = bounds[index], bounds[index + 1]
        found = rows[start:end]
        polygons: tuple[Any, ...] = ()
        if outlines is not None and len(found):
            frame_outlines = outlines[start:end]
            polygons = tuple(outline for outline in frame_outlines if len(outline))
            if len(polygons) < len(found):  # a mask wholly outside its box or the frame: Ultralytics drops these too
                found = found[[len(outline) > 0 for outline in frame_outlines]]
        if len(found) == 0:
            out.append(Detections.empty())
            continue
        out.append(Detections(
            boxes_xyxy=np.ascontiguousarray(found[:, :4], np.float32),
            confidences=np.ascontiguousarray(found[:, 4], np.float32),
            class_ids=found[:, 5].astype(np.int64),
            polygons=polygons,
        ))
    return out


def _source_outlines(trace: _Tracer, rows: npt.NDArray[np.float32], image_index: npt.NDArray[np.int64],
                     bounds: list[int], plan: Sequence[Letterbox]) -> list[npt.NDArray[np.float32]]:
    """Every row's outline, traced in its frame's visible pixels, then scaled back to the source frame and clipped
    to it: the scaling for the whole batch at once, three array operations in all rather than three per outline."""
    gains = np.array([box.gain_xy for box in plan], np.float32).reshape(-1, 2)
    limits = np.array([(box.source_hw[1], box.source_hw[0]) for box in plan], np.float32).reshape(-1, 2)
    visible_boxes = rows[:, :4] * np.tile(gains, 2)[image_index]
    outlines: list[npt.NDArray[np.float32]] = []
    for box, start, end in zip(plan, bounds[:-1], bounds[1:], strict=True):
        if end > start:
            outlines.extend(trace(start, end, box, visible_boxes[start:end]))
    lengths = [len(outline) for outline in outlines]
    points = np.concatenate(outlines).reshape(-1, 2)
    owner = np.repeat(image_index, lengths)
    points /= gains[owner]
    np.minimum(np.maximum(points, 0, out=points), limits[owner], out=points)
    return split_points(points, lengths)
