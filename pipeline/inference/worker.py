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
from pipeline.frames import Batch, Frame, FrameResult
from pipeline.inference.detector import Detector
from pipeline.inference.devices import use_device_in_this_thread
from pipeline.ledger import FrameLedger
from pipeline.ops.health import Heartbeats
from pipeline.ops.metrics import PipelineMetrics
from pipeline.threads import StageThread

log = logging.getLogger(__name__)


class InferenceWorker:
    """One device's worker: takes batches from the hub, runs the detector, hands each frame's result on.

    Two threads form a two-stage pipeline with at most one batch between them: `infer-<device>` takes a
    batch and queues its device work; `finish-<device>` waits for it, builds the results and hands them to
    the analytics stage, a batch at a time. While the host turns one batch's masks into polygons, the device
    already runs the next, and batches stay in order, so each stream's results do too. A batch the model fails
    on drops its frames (inference_error).
    """

    def __init__(
        self,
        detector: Detector,
        hub: FrameHub,
        batching: BatchingConfig,
        deliver: Callable[[list[FrameResult]], None],
        ledger: FrameLedger,
        metrics: PipelineMetrics,
        heartbeats: Heartbeats,
        worker_index: int = 0,
    ) -> None:
        self._detector = detector
        self._hub = hub
        self._batching = batching
        self._deliver = deliver
        self._ledger = ledger
        self._metrics = metrics
        self._worker_index = worker_index
        self._stop = threading.Event()
        self._handoff: queue.Queue[tuple[Batch, Any, float] | None] = queue.Queue(maxsize=1)
        suffix = detector.device if worker_index == 0 else f"{detector.device}-{worker_index}"
        self._thread = StageThread(f"infer-{suffix}", self._run, heartbeats)
        self._finisher = StageThread(f"finish-{suffix}", self._finish, heartbeats)
        self._stage = {stage: metrics.stage_seconds.labels(stage=stage)
                       for stage in ("queue", "preprocess", "infer", "postprocess")}

    @property
    def thread_name(self) -> str:
        return self._thread.name

    @property
    def detector(self) -> Detector:
        return self._detector

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
                self._thread.beat()
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
                self._thread.beat()

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
            self._failed(abandoned, logged=False)

    def _failed(self, batch: Batch, logged: bool = True) -> None:
        if logged:
            log.exception("inference failed on a batch of %d frames", len(batch.frames))
        self._metrics.inference_errors.labels(device=self._detector.device).inc()
        for frame in batch.frames:
            self._ledger.dropped(frame.ticket, "inference_error")
        self._hub.batch_done(batch)

    def _finish(self) -> None:
        use_device_in_this_thread(self._detector.device)
        while True:
            self._finisher.beat()
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
            try:
                self._observe(batch, results, time.monotonic() - submitted)
                formed = batch.formed_monotonic
                self._deliver_all([replace(result, queue_ms=max(0.0, (formed - result.frame.captured_monotonic) * 1000))
                                   for result in results])
            finally:
                self._hub.batch_done(batch)

    def _deliver_all(self, results: list[FrameResult]) -> None:
        """The next stage settles or takes each result itself; one that raises anyway loses the batch's frames
        (analytics_error) and the finisher goes on: every later batch of every stream waits for it."""
        try:
            self._deliver(results)
        except Exception:
            log.exception("handing on the results of a batch of %d frames failed; dropped", len(results))
            for result in results:
                self._ledger.dropped(result.frame.ticket, "analytics_error")

    def _observe(self, batch: Batch, results: list[FrameResult], total_s: float) -> None:
        """Per batch: the model alone (`vap_inference_seconds`, and the infer stage), its pre- and
        post-processing, and each frame's wait in the hub. A detector that cannot tell its parts apart
        reports the whole batch as the model's time."""
        device = self._detector.device
        timings = results[0].timings if results else None
        infer_s = total_s if timings is None else timings.infer_s
        self._metrics.inference_seconds.labels(device=device).observe(infer_s)
        self._metrics.batch_size.labels(device=device).observe(len(batch.frames))
        self._stage["infer"].observe(infer_s)
        if timings is not None:
            self._stage["preprocess"].observe(timings.preprocess_s)
            self._stage["postprocess"].observe(timings.postprocess_s)
        for frame in batch.frames:
            self._stage["queue"].observe(max(0.0, batch.formed_monotonic - frame.captured_monotonic))


def drain_and_stop(workers: list[InferenceWorker], hub: FrameHub, deadline: float, workers_s: float,
                   results_refused: threading.Event, drop: Callable[[list[Frame], str], None]) -> bool:
    """A pipeline's stop: the hub drains through the model until `deadline`, and what is left there is
    dropped; the workers then have `workers_s` to finish their batches. Returns whether a worker is still
    stuck, in which case the frames of its batches were dropped and its results must be refused."""
    while workers and not hub.drained() and time.monotonic() < deadline:
        time.sleep(0.02)
    drop(hub.discard_waiting(), "read but not inferred")
    results_refused.set()  # a worker waiting for room in the analytics stage gives up from here on
    for worker in workers:
        worker.stop()
    workers_deadline = time.monotonic() + workers_s
    for worker in workers:
        worker.join(max(0.0, workers_deadline - time.monotonic()))
    stuck = [worker.thread_name for worker in workers if worker.is_alive()]
    if stuck:
        drop(hub.abandon_in_flight(), f"in the batches of {', '.join(stuck)}")
    return bool(stuck)
