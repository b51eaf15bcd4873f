"""The inference stage: an Ultralytics model that runs whole batches, and the worker thread that feeds it.

The model is loaded once and warmed with the real batch sizes before the pipeline reports ready, so the
first camera frames do not pay for lazy initialisation. Results come back in source-frame pixels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Protocol

import numpy as np

from pipeline.config import ModelConfig
from pipeline.errors import ModelMismatch
from pipeline.frames import BatchTimings, Frame, FrameResult, host_image
from pipeline.inference.cudagraphs import GraphedForward, batch_buckets
from pipeline.inference.devices import use_device_in_this_thread
from pipeline.inference.model_info import class_ids_for, model_display_name, model_labels, unsupported_task
from pipeline.inference.polygon_pool import PolygonPool
from pipeline.inference.postprocess import BatchDetections, assemble, batched_nms, frame_detections, pack_mask_windows
from pipeline.inference.predicted import predicted_classes, predicted_detections
from pipeline.inference.preprocess import DeviceLetterbox, HostLetterbox, Letterbox, plan_batch
from pipeline.inference.quantize import calibration_for
from pipeline.inference.runtimes import OpenVinoRequests, default_export_dir, discard, resolve_model

log = logging.getLogger(__name__)

_MAX_DETECTIONS = 300


class Detector(Protocol):
    """A model that turns a batch of frames into one result per frame, in the same order.

    `submit` queues a batch's device work and returns at once where the device allows; `collect` waits
    for it and builds the results. A worker keeps one batch in each, so host and device overlap.
    """

    name: str
    task: str
    device: str
    runtime: str
    labels: dict[int, str]

    def warmup(self, batch_sizes: Sequence[int]) -> None: ...

    def submit(self, frames: Sequence[Frame]) -> Any: ...

    def collect(self, pending: Any) -> list[FrameResult]: ...

    def close(self) -> None: ...


def infer(detector: Detector, frames: Sequence[Frame]) -> list[FrameResult]:
    """One batch, start to finish."""
    return detector.collect(detector.submit(frames))


@dataclass(frozen=True)
class _ExportedModel:
    """What the direct path reads from Ultralytics' backend, for a model that runs without one."""

    fp16: bool
    end2end: bool


@dataclass
class PendingBatch:
    """A batch whose device work is queued: on a GPU, `outputs` are the model's, NMS and masks still to run, and
    the results reach the host when `copied` fires; with OpenVINO, `request` is still running the model."""

    frames: Sequence[Frame]
    started: float
    plan: list[Letterbox] = field(default_factory=list)
    found: BatchDetections | None = None
    copied: Any = None
    request: Any = None
    raw: list[Any] | None = None
    preprocess_s: float = 0.0
    infer_s: float = 0.0
    postprocess_s: float = 0.0
    device_clock: tuple[Any, Any] | None = None  # CUDA events around the model alone
    outputs: Any = None


class UltralyticsDetector:
    """Runs an Ultralytics detect, segment or classify model on whole batches.

    Detection and segmentation bypass `YOLO.predict`: frames are letterboxed in batch (on the device when
    it is a GPU), NMS, box rescaling and mask assembly run on the device, and only boxes and each binary
    mask's window around its box come back to the host, where masks become polygons. On the CPU each mask is
    upsampled only inside its box, as its polygon is traced. Other tasks go through `predict`.
    """

    def __init__(self, config: ModelConfig, device: str, max_batch: int = 1,
                 calibration_urls: Sequence[str] = ()) -> None:
        from ultralytics import YOLO

        self._config = config
        self.device = device
        self.precision = config.effective_precision(device)
        self._half = self.precision == "fp16"
        task = None if config.task == "auto" else config.task
        try:
            original = YOLO(config.weights, task=task)
        except Exception as error:
            raise RuntimeError(
                f"model.weights: cannot load {config.weights!r} ({error}); set it to a model file on this machine "
                "(a model name like yolo11n.pt downloads only where the internet is reachable)"
            ) from error
        self.task = str(original.task)
        task_problem = unsupported_task(self.task, config.weights)
        if task_problem is not None:
            raise ModelMismatch(task_problem)
        self.labels = model_labels(original)
        self._class_filter = class_ids_for(config.classes, self.labels, "model.classes")
        export_dir = config.export_dir or default_export_dir()
        int8 = calibration_for(config, calibration_urls) if self.precision == "int8" else None
        resolved = resolve_model(config.weights, config.runtime, device, config.imgsz, max_batch, self._half,
                                 export_dir, int8)
        self.runtime = resolved.runtime
        self._resolved = resolved
        self._requests: OpenVinoRequests | None = None
        self._model = original if resolved.path == config.weights else YOLO(resolved.path, task=self.task)
        self.name = model_display_name(config.weights)
        self._direct = self.task in ("detect", "segment")
        self._cuda = device.startswith("cuda")
        self._letterbox: HostLetterbox | DeviceLetterbox = DeviceLetterbox(device) if self._cuda else HostLetterbox()
        self._backend: Any = None
        self._max_batch = max_batch
        self._graphed: GraphedForward | None = None
        self._stride = 32
        self._rect = True
        self._polygons = PolygonPool(config.polygon_processes) if config.polygon_processes else None

    def _ensure_backend(self) -> Any:
        """The runtime backend, loaded on first use. A cached export that does not load (corrupt, or from a
        runtime that reads it differently) is discarded and the model runs on PyTorch, as an export that
        fails does: an optimisation never stops the pipeline."""
        if self._backend is None:
            try:
                self._load_backend()
            except Exception as error:
                if self.runtime == "torch":
                    raise
                log.warning("the %s export of %s in %s does not load (%s); discarding it and running on PyTorch",
                            self.runtime, self.name, self._resolved.cache_dir, error)
                log.debug("export load failure", exc_info=True)
                discard(self._resolved)
                from ultralytics import YOLO

                self._resolved = replace(self._resolved, path=self._config.weights, runtime="torch", cache_dir=None)
                self.runtime = "torch"
                self._requests = None
                self._model = YOLO(self._config.weights, task=self.task)
                self._load_backend()
        return self._backend

    def _load_backend(self) -> None:
        """Let Ultralytics build its predictor and runtime backend once, then use them directly; an OpenVINO
        model on the CPU runs through our own request pool instead, and Ultralytics never compiles it."""
        if self._direct and self.runtime == "openvino" and self.device == "cpu":
            try:
                self._requests = OpenVinoRequests(self._resolved.path)
            except Exception:
                log.warning("OpenVINO throughput mode unavailable; running one request at a time", exc_info=True)
            else:
                self._stride, self._rect = self._requests.stride, self._requests.dynamic
                self._backend = _ExportedModel(fp16=False, end2end=self._requests.end2end)
                return
        size = self._config.imgsz
        self._predict([np.zeros((size, size, 3), np.uint8)])
        predictor = self._model.predictor
        backend = predictor.model
        stride = backend.stride
        self._stride = int(max(stride)) if isinstance(stride, (list, tuple)) else int(stride)
        dynamic = bool(getattr(backend, "dynamic", False)) and backend.format != "imx"
        self._rect = bool(predictor.args.rect) and (backend.format == "pt" or dynamic)
        self._backend = backend
        if (self._cuda and self._direct and self._config.cuda_graphs and backend.format == "pt"
                and not bool(getattr(backend, "end2end", False))):
            self._graphed = GraphedForward(backend, backend.model, self._max_batch)

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        """Runs each batch size on square and 16:9 frames: a GPU compiles kernels per input shape, and most
        cameras are 16:9, whose input is a stride-aligned rectangle rather than the square."""
        size = self._config.imgsz
        use_device_in_this_thread(self.device)  # Ultralytics selects it only when it first loads the model
        self._ensure_backend()
        sizes = set(batch_sizes)
        if self._graphed is not None:  # every graph a batch can be padded to, so none is captured mid-stream
            sizes.update(bucket for bucket in batch_buckets(self._max_batch) if bucket <= max(sizes))
        now = time.monotonic()
        for height, width in ((size, size), (size * 9 // 16, size)):
            image = np.zeros((height, width, 3), np.uint8)
            for batch_size in sorted(sizes):
                frames = [Frame("warmup", index, None, datetime.now(timezone.utc), now, image)
                          for index in range(batch_size)]
                infer(self, frames)

    def _predict(self, images: list[Any]) -> list[Any]:
        return list(
            self._model.predict(
                images,
                imgsz=self._config.imgsz,
                conf=self._config.conf,
                iou=self._config.iou,
                classes=self._class_filter,
                agnostic_nms=self._config.agnostic_nms,
                quantize=16 if self._half else None,
                device=self.device,
                verbose=False,
            )
        )

    def submit(self, frames: Sequence[Frame]) -> PendingBatch:
        if not self._direct:
            pending = PendingBatch(frames=frames, started=time.monotonic())
            pending.raw = self._predict([host_image(frame.image) for frame in frames])
            pending.infer_s = time.monotonic() - pending.started
            return pending
        batch, pending = self.letterbox_batch(frames)
        return self.forward(batch, pending)

    def letterbox_batch(self, frames: Sequence[Frame]) -> tuple[Any, PendingBatch]:
        """The model input for `frames` (on the model's device) and the batch it belongs to. For OpenVINO's
        request pool it is the uint8 letterboxed batch, valid until the next call."""
        import torch

        pending = PendingBatch(frames=frames, started=time.monotonic())
        backend = self._ensure_backend()
        images = [frame.image for frame in frames]
        pending.plan = plan_batch(images, self._config.imgsz, self._stride, self._rect)
        if self._requests is not None:  # OpenVINO on the CPU: the compiled model converts the uint8 batch
            assert isinstance(self._letterbox, HostLetterbox)
            batch: Any = self._letterbox.uint8(images, pending.plan)
            pending.preprocess_s = time.monotonic() - pending.started
            return batch, pending
        dtype = torch.float16 if backend.fp16 else torch.float32
        with torch.inference_mode():
            batch = self._letterbox(images, pending.plan, dtype)
            batch = batch if self._cuda or self.device == "cpu" else batch.to(self.device)
        pending.preprocess_s = time.monotonic() - pending.started
        return batch, pending

    @property
    def in_flight(self) -> int:
        """How many batches the device runs at once at best: several OpenVINO requests, else one."""
        return self._requests.size if self._requests is not None else 1

    def forward(self, batch: Any, pending: PendingBatch) -> PendingBatch:
        """Queues the model on a prepared input and, on the CPU, runs NMS and mask assembly; `complete` waits
        for them (on a GPU, runs them), and `collect` (which completes first) builds the results.

        On a GPU, NMS waits for the model's output, so run here it would keep the inference thread from
        preparing the next batch while the device works on this one. The finisher runs it instead, on a copy
        of the outputs when they are a CUDA graph's, which its next replay overwrites."""
        import torch

        backend = self._ensure_backend()
        if self._requests is not None:
            pending.request = self._requests.start(batch)
            return pending
        with torch.inference_mode():
            started = time.monotonic()
            if self._cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                begin.record(torch.cuda.current_stream(self.device))
                preds = (self._graphed or backend)(batch)
                end.record(torch.cuda.current_stream(self.device))
                pending.device_clock = (begin, end)
                pending.outputs = preds if self._graphed is None else _copied(preds)
                return pending
            preds = backend(batch)
            pending.infer_s = time.monotonic() - started
            self._postprocess(preds, pending)
        return pending

    def complete(self, pending: PendingBatch) -> None:
        """Waits for a batch's device work; NMS and masks run here when the model ran asynchronously (on a GPU
        or in OpenVINO's requests)."""
        import torch

        if pending.request is not None and self._requests is not None:
            outputs, pending.infer_s = self._requests.finish_timed(pending.request)
            pending.request = None
            with torch.inference_mode():
                self._postprocess([torch.from_numpy(output) for output in outputs], pending)
        if pending.outputs is not None:
            outputs, pending.outputs = pending.outputs, None
            with torch.inference_mode():
                self._postprocess(outputs, pending)
        if pending.copied is not None:
            pending.copied.synchronize()
        if pending.device_clock is not None:
            begin, end = pending.device_clock
            pending.infer_s = float(begin.elapsed_time(end)) / 1000
            pending.device_clock = None

    def _postprocess(self, preds: Any, pending: PendingBatch) -> None:
        """NMS, box rescaling and mask assembly for the whole batch on the model's device; on a GPU only the
        boxes and each mask's window are copied to the host, without waiting: `complete` waits for them."""
        import torch

        started = time.monotonic()
        segment = self.task == "segment"
        protos = None
        if segment:
            protos = preds[0][1] if isinstance(preds[0], tuple) else preds[1]
            preds = preds[0]
        if isinstance(preds, (list, tuple)):
            preds = preds[0]
        if bool(getattr(self._backend, "end2end", False)):
            rows, image_index = self._end_to_end_rows(preds)
        else:
            rows, image_index = batched_nms(preds, len(self.labels), self._config.conf, self._config.iou,
                                            self._class_filter, self._config.agnostic_nms, pending.plan[0].input_hw,
                                            max_det=_MAX_DETECTIONS)
        found = assemble(rows, image_index, pending.plan, protos, full_masks=self._cuda)
        if self._cuda:
            found = pack_mask_windows(found, pending.plan).to_host()
            pending.copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
            # On this device's stream: a thread's current device is cuda:0 unless set, which is wrong on cuda:1.
            pending.copied.record(torch.cuda.current_stream(self.device))
        pending.found = found
        pending.postprocess_s += time.monotonic() - started

    def _end_to_end_rows(self, preds: Any) -> tuple[Any, Any]:
        """Models with NMS built in (YOLO26, YOLOv10) only need their confidence and class filter."""
        import torch
        from ultralytics.utils import nms

        per_image = nms.non_max_suppression(preds, self._config.conf, self._config.iou, self._class_filter,
                                            self._config.agnostic_nms, max_det=_MAX_DETECTIONS, end2end=True)
        counts = torch.tensor([len(rows) for rows in per_image], device=per_image[0].device)
        image_index = torch.repeat_interleave(torch.arange(len(per_image), device=counts.device), counts)
        return torch.cat(per_image), image_index

    def collect(self, pending: PendingBatch) -> list[FrameResult]:
        self.complete(pending)
        started = time.monotonic()
        if pending.raw is not None:
            per_frame = [(predicted_detections(r), predicted_classes(r, self._class_filter, self._config.conf,
                                                                    self.labels)) for r in pending.raw]
        else:
            assert pending.found is not None
            trace = frame_detections if self._polygons is None else self._polygons.frame_detections
            per_frame = [(detections, ()) for detections in trace(pending.found, pending.plan)]
        finished = time.monotonic()
        timings = BatchTimings(pending.preprocess_s, pending.infer_s, pending.postprocess_s + finished - started)
        return [
            FrameResult(frame=frame, task=self.task, detections=detections, classes=classes, labels=self.labels,
                        inference_ms=pending.infer_s * 1000, inferred_monotonic=finished, timings=timings)
            for frame, (detections, classes) in zip(pending.frames, per_frame, strict=True)
        ]

    @property
    def polygon_pool(self) -> PolygonPool | None:
        return self._polygons


    def close(self) -> None:
        """Ends the upload copy threads and polygon workers; `submit` must not be called afterwards."""
        if isinstance(self._letterbox, DeviceLetterbox):
            self._letterbox.close()
        if self._polygons is not None:
            self._polygons.close()


def _copied(outputs: Any) -> Any:
    """The tensors of a CUDA graph's outputs (nested in tuples and lists) copied out of its static memory."""
    import torch

    if isinstance(outputs, torch.Tensor):
        return outputs.clone()
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(_copied(item) for item in outputs)
    return outputs
