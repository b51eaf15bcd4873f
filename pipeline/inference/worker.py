"""The inference worker: the threads that take batches from the hub, run the detector and hand results on."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pipeline.batching.hub import FrameHub
from pipeline.config import BatchingConfig
from pipeline.frames import Batch, FrameResult
from pipeline.inference.detector import Detector
from pipeline.inference.devices import use_device_in_this_thread
from pipeline.ops.health import Heartbeats
from pipeline.ops.metrics import PipelineMetrics

log = logging.getLogger(__name__)


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
