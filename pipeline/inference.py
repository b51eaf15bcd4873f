"""The inference stage: an Ultralytics model that runs whole batches, and the worker thread that feeds it.

The model is loaded once and warmed with the real batch sizes before the pipeline reports ready, so the
first camera frames do not pay for lazy initialisation. Results come back in source-frame pixels.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.batching import FrameHub
from pipeline.config import BatchingConfig, ModelConfig, ModelMismatch, PipelineConfig
from pipeline.cudagraphs import GraphedForward, batch_buckets
from pipeline.frames import Batch, Classification, Detections, Frame, FrameResult, host_image
from pipeline.health import Heartbeats
from pipeline.metrics import PipelineMetrics
from pipeline.postprocess import BatchDetections, assemble, batched_nms, mask_polygons
from pipeline.preprocess import DeviceLetterbox, HostLetterbox, Letterbox, plan_batch
from pipeline.runtimes import OpenVinoRequests, default_export_dir, discard, resolve_model

log = logging.getLogger(__name__)

_MAX_DETECTIONS = 300
_CLASSES_SHOWN = 20
_TOP_CLASSES = 5


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


def resolve_devices(requested: str | list[str]) -> list[str]:
    """Every device that gets a worker: each CUDA GPU for `auto` when there is one, else the CPU."""
    import torch

    names = [_canonical_device(name) for name in ([requested] if isinstance(requested, str) else requested)]
    if names == ["auto"]:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{index}" for index in range(count)] or ["cpu"]
    for name in names:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"model.device is {name} but no CUDA device is available; use 'cpu' or 'auto'")
    return names


def worker_for_decoder(decoder: str, worker_devices: list[str]) -> int | None:
    """The worker on the GPU that decodes a stream, so its frames never cross between devices; None for a stream
    decoded on the CPU, or on a GPU no worker runs on (its frames are then copied over)."""
    if decoder == "cpu":
        return None
    device = _canonical_device(decoder)
    return worker_devices.index(device) if device in worker_devices else None


def _canonical_device(name: str) -> str:
    """`0` and `cuda` mean `cuda:0`, as in Ultralytics; one spelling keeps metric labels and checks simple."""
    if name.isdigit():
        return f"cuda:{name}"
    return "cuda:0" if name == "cuda" else name


def resolve_device(requested: str | list[str]) -> str:
    """The first device `resolve_devices` picks; for single-device tools such as the benchmark."""
    return resolve_devices(requested)[0]


def use_device_in_this_thread(device: str) -> None:
    """Makes `device` the calling thread's current CUDA device. The current device is per thread and
    starts at cuda:0 in every new one; what depends on it rather than on a tensor's device (a TensorRT
    execution context, indexless `cuda` calls) would otherwise run against the wrong GPU, failing with
    "invalid resource handle" on any but cuda:0."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(torch.device(device))


def model_display_name(weights: str) -> str:
    return Path(weights).stem


def class_ids_for(entries: list[int | str] | None, labels: dict[int, str], key_path: str) -> list[int] | None:
    """Ids for a config's class list, which may name classes by id or label. An entry the model does not
    have is a startup error: kept silently, it would filter out everything, and nothing would say why."""
    if entries is None:
        return None
    by_label = {label: class_id for class_id, label in labels.items()}
    ids = []
    for entry in entries:
        class_id = entry if isinstance(entry, int) else by_label.get(entry)
        if class_id is None or class_id not in labels:
            shown = ", ".join(f"{known_id} {label}" for known_id, label in list(labels.items())[:_CLASSES_SHOWN])
            more = f" and {len(labels) - _CLASSES_SHOWN} more" if len(labels) > _CLASSES_SHOWN else ""
            raise ModelMismatch(f"{key_path}: {entry!r} is not a class of the model; its classes are {shown}{more}")
        ids.append(class_id)
    return ids


def unsupported_task(task: str, weights: str) -> str | None:
    if task != "obb":
        return None
    return (f"model.weights: {weights!r} is an oriented-box (obb) model, which vap does not support yet; use a "
            "detect, segment, classify or pose model")


def model_labels(model: Any) -> dict[int, str]:
    return {int(k): str(v) for k, v in model.names.items()}


def model_mismatches(config: PipelineConfig) -> list[str] | None:
    """What the model contradicts in a config (a class it does not have, a task vap cannot run), so that
    `vap validate` finds it before a run at a camera site does. None when the weights are not on this
    machine: a bare model name would start a download, which `validate` must not do."""
    weights = config.model.weights
    if not (Path(weights).exists() or weights.endswith((".yaml", ".yml"))):
        return None
    from ultralytics import YOLO

    model = YOLO(weights, task=None if config.model.task == "auto" else config.model.task)
    labels = model_labels(model)
    checks: list[tuple[list[int | str] | None, str]] = [(config.model.classes, "model.classes")]
    for stream_index, stream in enumerate(config.streams):
        analytics = f"streams[{stream_index}].analytics"
        checks += [(zone.classes, f"{analytics}.zones[{i}].classes") for i, zone in enumerate(stream.analytics.zones)]
        checks += [(line.classes, f"{analytics}.lines[{i}].classes") for i, line in enumerate(stream.analytics.lines)]
    task_problem = unsupported_task(str(model.task), weights)
    problems = [] if task_problem is None else [task_problem]
    for entries, key_path in checks:
        try:
            class_ids_for(entries, labels, key_path)
        except ModelMismatch as error:
            problems.append(str(error))
    return problems


@dataclass(frozen=True)
class _ExportedModel:
    """What the direct path reads from Ultralytics' backend, for a model that runs without one."""

    fp16: bool
    end2end: bool


@dataclass
class PendingBatch:
    """A batch whose device work is queued: on a GPU its results reach the host when `copied` fires; with
    OpenVINO, `request` is still running the model."""

    frames: Sequence[Frame]
    started: float
    plan: list[Letterbox] = field(default_factory=list)
    found: BatchDetections | None = None
    copied: Any = None
    request: Any = None
    raw: list[Any] | None = None


class UltralyticsDetector:
    """Runs an Ultralytics detect, segment or classify model on whole batches.

    Detection and segmentation bypass `YOLO.predict`: frames are letterboxed in batch (on the device when
    it is a GPU), NMS, box rescaling and mask assembly run on the device, and only boxes and binary uint8
    masks at model-input size come back to the host, where masks become polygons. Other tasks go through
    `predict`.
    """

    def __init__(self, config: ModelConfig, device: str, max_batch: int = 1) -> None:
        from ultralytics import YOLO

        self._config = config
        self.device = device
        self._half = device.startswith("cuda") if config.half == "auto" else bool(config.half)
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
        resolved = resolve_model(config.weights, config.runtime, device, config.imgsz, max_batch, self._half,
                                 export_dir)
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
            return pending
        batch, pending = self.letterbox_batch(frames)
        return self.forward(batch, pending)

    def letterbox_batch(self, frames: Sequence[Frame]) -> tuple[Any, PendingBatch]:
        """The model input for `frames` (on the model's device) and the batch it belongs to."""
        import torch

        pending = PendingBatch(frames=frames, started=time.monotonic())
        backend = self._ensure_backend()
        images = [frame.image for frame in frames]
        pending.plan = plan_batch(images, self._config.imgsz, self._stride, self._rect)
        dtype = torch.float16 if backend.fp16 else torch.float32
        with torch.inference_mode():
            batch = self._letterbox(images, pending.plan, dtype)
            return (batch if self._cuda or self.device == "cpu" else batch.to(self.device)), pending

    @property
    def in_flight(self) -> int:
        """How many batches the device runs at once at best: several OpenVINO requests, else one."""
        return self._requests.size if self._requests is not None else 1

    def forward(self, batch: Any, pending: PendingBatch) -> PendingBatch:
        """Queues the model, NMS and mask assembly on a prepared input; `complete` waits for them, and
        `collect` (which completes first) builds the results."""
        import torch

        backend = self._ensure_backend()
        if self._requests is not None:
            pending.request = self._requests.start(np.ascontiguousarray(batch.numpy(), np.float32))
            return pending
        with torch.inference_mode():
            self._postprocess((self._graphed or backend)(batch), pending)
        return pending

    def complete(self, pending: PendingBatch) -> None:
        """Waits for a batch's device work; NMS and masks run here when the model ran asynchronously."""
        import torch

        if pending.request is not None and self._requests is not None:
            outputs = self._requests.finish(pending.request)
            pending.request = None
            with torch.inference_mode():
                self._postprocess([torch.from_numpy(output) for output in outputs], pending)
        if pending.copied is not None:
            pending.copied.synchronize()

    def _postprocess(self, preds: Any, pending: PendingBatch) -> None:
        """NMS, box rescaling and mask assembly for the whole batch on the model's device; the small
        results are copied to the host without waiting, so the next batch can start meanwhile."""
        import torch

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
        found = assemble(rows, image_index, pending.plan, protos)
        if self._cuda:
            found = BatchDetections(
                rows=found.rows.to("cpu", non_blocking=True),
                image_index=found.image_index.to("cpu", non_blocking=True),
                masks=None if found.masks is None else found.masks.to("cpu", non_blocking=True),
            )
            pending.copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
            # On this device's stream: a thread's current device is cuda:0 unless set, which is wrong on cuda:1.
            pending.copied.record(torch.cuda.current_stream(self.device))
        pending.found = found

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
        finished = time.monotonic()
        inference_ms = (finished - pending.started) * 1000
        if pending.raw is not None:
            per_frame = [(self._result_detections(r), self._result_classes(r)) for r in pending.raw]
        else:
            per_frame = [(d, ()) for d in self._detections(pending)]
        return [
            FrameResult(frame=frame, task=self.task, detections=detections, classes=classes, labels=self.labels,
                        inference_ms=inference_ms, inferred_monotonic=finished)
            for frame, (detections, classes) in zip(pending.frames, per_frame, strict=True)
        ]

    def _detections(self, pending: PendingBatch) -> list[Detections]:
        assert pending.found is not None
        rows = pending.found.rows.numpy()
        image_index = pending.found.image_index.numpy()
        masks = None if pending.found.masks is None else pending.found.masks.numpy()
        bounds = np.searchsorted(image_index, np.arange(len(pending.plan) + 1))
        out: list[Detections] = []
        for index, box in enumerate(pending.plan):
            start, end = int(bounds[index]), int(bounds[index + 1])
            found = rows[start:end]
            polygons: tuple[Any, ...] = ()
            if masks is not None and len(found):
                resized_h, resized_w = box.resized_hw
                scale = np.array(box.gain_xy, np.float32)
                visible_part = masks[start:end, box.top:box.top + resized_h, box.left:box.left + resized_w]
                outlines = mask_polygons(visible_part, found[:, :4] * np.tile(scale, 2))
                visible = np.array([len(outline) > 0 for outline in outlines])
                if not visible.all():  # a mask wholly outside its box or the frame: Ultralytics drops these too
                    found = found[visible]
                limit = np.array([box.source_hw[1], box.source_hw[0]], np.float32)
                for outline in outlines:  # fresh arrays: scaled back to the source frame and clipped in place
                    outline /= scale
                    np.minimum(np.maximum(outline, 0, out=outline), limit, out=outline)
                polygons = tuple(outline for outline in outlines if len(outline))
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

    def close(self) -> None:
        """Ends the upload copy threads; `submit` must not be called afterwards."""
        if isinstance(self._letterbox, DeviceLetterbox):
            self._letterbox.close()

    @staticmethod
    def _result_detections(result: Any) -> Detections:
        boxes = result.boxes
        if boxes is None or len(boxes) == 0:
            return Detections.empty()
        polygons: tuple[Any, ...] = ()
        if result.masks is not None:
            polygons = tuple(np.asarray(polygon, np.float32) for polygon in result.masks.xy)
        return Detections(
            boxes_xyxy=boxes.xyxy.cpu().numpy().astype(np.float32),
            confidences=boxes.conf.cpu().numpy().astype(np.float32),
            class_ids=boxes.cls.cpu().numpy().astype(np.int64),
            polygons=polygons,
        )

    def _result_classes(self, result: Any) -> tuple[Classification, ...]:
        """The five likeliest of the kept classes: Ultralytics' classification ignores `classes`, so the
        filter applies here, before the top five are picked, lest a kept class lose its place to others."""
        probs = result.probs
        if probs is None:
            return ()
        scores = np.asarray(probs.cpu().numpy().data, np.float32)
        kept = np.arange(len(scores))
        if self._class_filter is not None:  # int64 even when empty: np.unique([]) is float, useless as an index
            kept = np.unique(np.asarray(self._class_filter, np.int64))
        top = kept[np.argsort(-scores[kept], kind="stable")[:_TOP_CLASSES]]
        return tuple(
            Classification(int(class_id), self.labels.get(int(class_id), str(class_id)), float(scores[class_id]))
            for class_id in top
            if float(scores[class_id]) >= self._config.conf
        )


class InferenceWorker:
    """One device's worker: takes batches from the hub, runs the detector, hands each frame's result on.

    Two threads form a two-stage pipeline with at most one batch between them: `infer-<device>` takes a
    batch and queues its device work; `finish-<device>` waits for it, builds the results and delivers
    them. While the host turns one batch's masks into polygons, the device already runs the next, and
    batches stay in order, so each stream's results do too.
    """

    def __init__(
        self,
        detector: Detector,
        hub: FrameHub,
        batching: BatchingConfig,
        deliver: Callable[[FrameResult], None],
        metrics: PipelineMetrics,
        heartbeats: Heartbeats,
        worker_index: int = 0,
    ) -> None:
        self._detector = detector
        self._hub = hub
        self._batching = batching
        self._deliver = deliver
        self._metrics = metrics
        self._heartbeats = heartbeats
        self._worker_index = worker_index
        self._stop = threading.Event()
        self._handoff: queue.Queue[tuple[Batch, Any, float] | None] = queue.Queue(maxsize=1)
        suffix = detector.device if worker_index == 0 else f"{detector.device}-{worker_index}"
        self._thread = threading.Thread(target=self._run, name=f"infer-{suffix}", daemon=True)
        self._finisher = threading.Thread(target=self._finish, name=f"finish-{suffix}", daemon=True)

    @property
    def thread_name(self) -> str:
        return self._thread.name

    @property
    def device(self) -> str:
        return self._detector.device

    def start(self) -> None:
        self._finisher.start()
        self._thread.start()

    def stop(self) -> None:
        """Finish the batches in flight, then end."""
        self._stop.set()

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        self._thread.join(timeout)
        self._finisher.join(max(0.0, deadline - time.monotonic()))
        return not self.is_alive()

    def is_alive(self) -> bool:
        return self._thread.is_alive() or self._finisher.is_alive()

    def _run(self) -> None:
        batching = self._batching
        max_per_stream = batching.max_same_source_frames or batching.max_batch
        try:
            use_device_in_this_thread(self._detector.device)
            while not self._stop.is_set():
                self._heartbeats.beat(self.thread_name)
                self._metrics.queue_depth.labels(stage="batcher").set(self._hub.depth())
                batch = self._hub.take_batch(batching.max_batch, batching.max_wait_ms / 1000, max_per_stream,
                                             worker=self._worker_index)
                if batch is None:
                    continue
                submitted = time.monotonic()
                try:
                    pending = self._detector.submit(batch.frames)
                except Exception:
                    self._failed(batch)
                    continue
                if not self._hand_over((batch, pending, submitted)):
                    self._abandon(batch, pending)
                    return
        finally:
            self._heartbeats.forget(self.thread_name)
            self._hand_over(None)
            self._detector.close()

    def _hand_over(self, item: tuple[Batch, Any, float] | None) -> bool:
        """Blocks while the finisher is busy, beating so a long batch does not look like a stuck loop;
        False when the finisher is gone."""
        while True:
            if not self._finisher.is_alive():
                return False
            try:
                self._handoff.put(item, timeout=0.5)
                return True
            except queue.Full:
                self._heartbeats.beat(self.thread_name)

    def _abandon(self, batch: Batch, pending: Any) -> None:
        """The finisher died: wait for the device work of every batch it will never take, so each gives back
        what it holds (an OpenVINO request, staging memory), count them as failed, and stop this worker so
        health reports it."""
        left: list[tuple[Batch, Any]] = []
        while True:
            try:
                item = self._handoff.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                left.append(item[:2])
        left.append((batch, pending))
        log.error("%s is gone; %s stops after dropping %d frames", self._finisher.name, self.thread_name,
                  sum(len(abandoned.frames) for abandoned, _ in left))
        for abandoned, its_pending in left:
            try:
                self._detector.collect(its_pending)
            except Exception:
                log.debug("an abandoned batch failed as well", exc_info=True)
            self._metrics.inference_errors.labels(device=self._detector.device).inc()
            self._count_lost(abandoned)
            self._hub.batch_done(abandoned)

    def _failed(self, batch: Batch) -> None:
        log.exception("inference failed on a batch of %d frames", len(batch.frames))
        self._metrics.inference_errors.labels(device=self._detector.device).inc()
        self._count_lost(batch)
        self._hub.batch_done(batch)

    def _count_lost(self, batch: Batch) -> None:
        for frame in batch.frames:
            series = frame.series or self._metrics.stream(frame.stream_id)
            series.dropped["inference_error"].inc()

    def _finish(self) -> None:
        name = self._finisher.name
        device = self._detector.device
        try:
            use_device_in_this_thread(device)
            while True:
                self._heartbeats.beat(name)
                try:
                    item = self._handoff.get(timeout=0.5)
                except queue.Empty:
                    continue
                if item is None:
                    return
                batch, pending, submitted = item
                try:
                    results = self._detector.collect(pending)
                except Exception:
                    self._failed(batch)
                    continue
                self._metrics.inference_seconds.labels(device=device).observe(time.monotonic() - submitted)
                self._metrics.batch_size.labels(device=device).observe(len(batch.frames))
                try:
                    for result in results:
                        queue_ms = (batch.formed_monotonic - result.frame.captured_monotonic) * 1000
                        self._deliver_one(replace(result, queue_ms=max(0.0, queue_ms)))
                finally:
                    self._hub.batch_done(batch)
        finally:
            self._heartbeats.forget(name)

    def _deliver_one(self, result: FrameResult) -> None:
        """A result that cannot be delivered (a failing analytics step, say) is logged and counted; the
        finisher goes on, since every later batch of every stream waits for it."""
        try:
            self._deliver(result)
        except Exception:
            log.exception("stream %s: delivering the result of frame %d failed; it is not published",
                          result.frame.stream_id, result.frame.frame_id, extra={"stream": result.frame.stream_id})
            self._metrics.inference_errors.labels(device=self._detector.device).inc()
