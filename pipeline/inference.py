"""The inference stage: an Ultralytics model that runs whole batches, and the worker thread that feeds it.

The model is loaded once and warmed with the real batch sizes before the pipeline reports ready, so the
first camera frames do not pay for lazy initialisation. Results come back in source-frame pixels.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.batching import FrameHub
from pipeline.config import BatchingConfig, ModelConfig
from pipeline.frames import Batch, Classification, Detections, Frame, FrameResult
from pipeline.health import Heartbeats
from pipeline.metrics import PipelineMetrics
from pipeline.runtimes import default_export_dir, resolve_model

log = logging.getLogger(__name__)


class Detector(Protocol):
    """A model that turns a batch of frames into one result per frame, in the same order."""

    name: str
    task: str
    device: str
    runtime: str
    labels: dict[int, str]

    def warmup(self, batch_sizes: Sequence[int]) -> None: ...

    def infer(self, frames: Sequence[Frame]) -> list[FrameResult]: ...


def resolve_device(requested: str | list[str]) -> str:
    """Pick the device for the worker: the first CUDA GPU for `auto` when there is one, else the CPU."""
    import torch

    names = [requested] if isinstance(requested, str) else requested
    first = names[0]
    if first == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if first.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"model.device is {first} but no CUDA device is available; use 'cpu' or 'auto'")
    return first


def model_display_name(weights: str) -> str:
    return Path(weights).stem


class UltralyticsDetector:
    """Wraps `ultralytics.YOLO` for detect, segment and classify models."""

    def __init__(self, config: ModelConfig, device: str, max_batch: int = 1) -> None:
        from ultralytics import YOLO

        self._config = config
        self.device = device
        self._half = device.startswith("cuda") if config.half == "auto" else bool(config.half)
        task = None if config.task == "auto" else config.task
        original = YOLO(config.weights, task=task)
        self.task = str(original.task)
        self.labels: dict[int, str] = {int(k): str(v) for k, v in original.names.items()}
        export_dir = config.export_dir or default_export_dir()
        resolved = resolve_model(config.weights, config.runtime, device, config.imgsz, max_batch, self._half,
                                 export_dir)
        self.runtime = resolved.runtime
        self._model = original if resolved.path == config.weights else YOLO(resolved.path, task=self.task)
        self.name = model_display_name(config.weights)
        self._class_filter = self._class_ids(config.classes)

    def _class_ids(self, classes: list[int | str] | None) -> list[int] | None:
        if classes is None:
            return None
        by_name = {label: class_id for class_id, label in self.labels.items()}
        ids = []
        for entry in classes:
            if isinstance(entry, int):
                ids.append(entry)
            elif entry in by_name:
                ids.append(by_name[entry])
            else:
                raise ValueError(f"model.classes: '{entry}' is not a class of {self.name}")
        return ids

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        size = self._config.imgsz
        for batch_size in sorted(set(batch_sizes)):
            images = [np.zeros((size, size, 3), np.uint8) for _ in range(batch_size)]
            self._predict(images)

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

    def infer(self, frames: Sequence[Frame]) -> list[FrameResult]:
        started = time.monotonic()
        raw = self._predict([frame.image for frame in frames])
        finished = time.monotonic()
        inference_ms = (finished - started) * 1000
        return [
            FrameResult(
                frame=frame,
                task=self.task,
                detections=self._detections(result),
                classes=self._classes(result),
                labels=self.labels,
                inference_ms=inference_ms,
                inferred_monotonic=finished,
            )
            for frame, result in zip(frames, raw, strict=True)
        ]

    @staticmethod
    def _detections(result: Any) -> Detections:
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

    def _classes(self, result: Any) -> tuple[Classification, ...]:
        probs = result.probs
        if probs is None:
            return ()
        return tuple(
            Classification(int(class_id), self.labels.get(int(class_id), str(class_id)), float(confidence))
            for class_id, confidence in zip(probs.top5, probs.top5conf.cpu().numpy(), strict=False)
            if float(confidence) >= self._config.conf
        )


class InferenceWorker:
    """Takes batches from the hub, runs the detector, and hands each frame's result on."""

    def __init__(
        self,
        detector: Detector,
        hub: FrameHub,
        batching: BatchingConfig,
        deliver: Callable[[FrameResult], None],
        metrics: PipelineMetrics,
        heartbeats: Heartbeats,
    ) -> None:
        self._detector = detector
        self._hub = hub
        self._batching = batching
        self._deliver = deliver
        self._metrics = metrics
        self._heartbeats = heartbeats
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"infer-{detector.device}", daemon=True)

    @property
    def thread_name(self) -> str:
        return self._thread.name

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the batch in flight, then end."""
        self._stop.set()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        batching = self._batching
        max_per_stream = batching.max_same_source_frames or batching.max_batch
        device = self._detector.device
        while not self._stop.is_set():
            self._heartbeats.beat(self.thread_name)
            self._metrics.queue_depth.labels(stage="batcher").set(self._hub.depth())
            batch = self._hub.take_batch(batching.max_batch, batching.max_wait_ms / 1000, max_per_stream)
            if batch is None:
                continue
            try:
                self._run_batch(batch, device)
            finally:
                self._hub.batch_done(batch)
        self._heartbeats.forget(self.thread_name)

    def _run_batch(self, batch: Batch, device: str) -> None:
        started = time.monotonic()
        try:
            results = self._detector.infer(batch.frames)
        except Exception:
            log.exception("inference failed on a batch of %d frames", len(batch.frames))
            self._metrics.inference_errors.labels(device=device).inc()
            return
        self._metrics.inference_seconds.labels(device=device).observe(time.monotonic() - started)
        self._metrics.batch_size.labels(device=device).observe(len(batch.frames))
        for result in results:
            queue_ms = (batch.formed_monotonic - result.frame.captured_monotonic) * 1000
            self._deliver(replace(result, queue_ms=max(0.0, queue_ms)))
