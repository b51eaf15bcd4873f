"""The model in a process of its own (`model.inference_process`): one per device, fed whole batches.

Why: in vap's process the inference thread shares one interpreter lock with the readers, the finisher, the
analytics lanes and the publisher. On a GPU it needs the lock to prepare and launch every batch, so whatever
else holds it leaves the device idle. Here the device's model runs in a child interpreter of its own: vap's
inference thread copies the batch's pixels into memory both processes map and waits on a socket, holding no
lock, and the child letterboxes, runs the model, NMS and masks, traces the polygons and sends back a few arrays
(`pipeline.frames.pack_detections`).

The cost is one copy of each frame's pixels (0.02 ms for 640x360, 0.17 ms for 1080p, measured hot on a 2-core
EPYC host) and a round trip. On a CPU host the model already runs at its own limit in vap's process
(`benchmarks/README.md`), so the option is off by default. Frames a GPU decoded (`decoder: cuda`) stay on it:
they go to the child as CUDA IPC handles (`torch.multiprocessing`), and the pipeline keeps each tensor alive
until the child has answered for its batch.

Unlike the other helpers (`pipeline.children`), no part of the work falls back to vap's process: a second copy
of the model would double its device memory. A child that dies or stops answering is replaced, after a pause
that doubles while its replacements fail to load; the batches it held, and those taken until its successor is
ready, fail, and their frames are dropped as `inference_error`.

Protocol, over the socket the child inherits:
    pipeline -> child: ("load", ModelConfig, device, max_batch, calibration urls, batch sizes to warm up first:
                       none for the first child, those of its `warmup` for a replacement); answered by
                       ("loaded", name, task, runtime, labels, precision) or ("load failed", kind, detail)
    pipeline -> child: ("warmup", batch sizes); answered by ("warm",)
    pipeline -> child: ("inbox", slot, size), then a memfd's descriptor: the memory a batch's pixels are copied
                       into, one per slot, sent before a slot's first batch and whenever a batch needs more
    pipeline -> child: ("infer", request, slot, [(offset, height, width) in the slot's inbox, or a CUDA tensor
                       for a frame a GPU decoded, ...]); answered in order by
                       ("inferred", request, packed detections, classes per frame, inference ms, BatchTimings,
                       its polygon workers' pids and replacements or None, (the most GPU memory it has held
                       in MB, what it holds now in bytes) or None) or ("failed", request, traceback)
    pipeline -> child: ("quit",), or end of file when the pipeline goes
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import queue
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from pipeline.children import (
    QUIT_WAIT_S,
    RestartPause,
    WorkerProcess,
    bootstrap_for,
    new_inbox,
    receive_inbox,
    send_inbox,
)
from pipeline.config import ModelConfig
from pipeline.errors import ConfigError, ModelMismatch
from pipeline.frames import Frame, FrameResult, Image, host_image, pack_detections, unpack_detections

log = logging.getLogger(__name__)

_BOOTSTRAP = bootstrap_for("pipeline.inference.process_detector")
_LOAD_S = 900.0  # an INT8 model is quantized on first use, which takes minutes on a small CPU
_REPLY_S = 60.0  # a batch takes milliseconds on a GPU and seconds at most on a CPU
_READY_WAIT_S = 1.0  # how long a batch waits for a replacement to load before it fails
_SLOTS = 4  # the inference worker holds at most three batches: submitting, handed over, collecting
_SMALLEST_INBOX = 1 << 20


class InferenceProcessFailed(RuntimeError):
    """The batch is lost: the child failed on it, died, or did not answer."""


@dataclass
class _Request:
    number: int
    frames: Sequence[Frame]
    slot: int
    child: int


class _Child(WorkerProcess):
    """One child, the generation it is (a replacement is the next), and the inboxes it maps."""

    def __init__(self, generation: int) -> None:
        super().__init__(_BOOTSTRAP)
        self.generation = generation
        self.inboxes: list[mmap.mmap | None] = [None] * _SLOTS


class _ChildPolygonWorkers:
    """The child's polygon workers (`model.polygon_processes`) as its answers report them, so vap's metrics and
    the bench's CPU accounting see them beside vap's other helpers."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self._replaced_before = 0  # by the children before this one
        self._replaced_now = 0

    @property
    def replacements(self) -> int:
        return self._replaced_before + self._replaced_now

    def reported(self, pids: list[int], replacements: int) -> None:
        self.pids, self._replaced_now = pids, replacements

    def child_gone(self) -> None:
        """Its workers end with it, and the next child's count from zero."""
        self.pids, self._replaced_before, self._replaced_now = [], self.replacements, 0


class ProcessDetector:
    """A `Detector` whose model runs in a child process. `submit` is called by the inference thread and
    `collect` by the finisher, in the order of submission."""

    def __init__(self, config: ModelConfig, device: str, max_batch: int = 1,
                 calibration_urls: Sequence[str] = ()) -> None:
        self.device = device
        self._load_message: tuple[Any, ...] = ("load", config, device, max_batch, list(calibration_urls), [])
        self._lock = threading.Lock()
        self._free_slots: queue.Queue[int] = queue.Queue()
        for slot in range(_SLOTS):
            self._free_slots.put(slot)
        self._inboxes: list[mmap.mmap | None] = [None] * _SLOTS
        self._descriptors = [-1] * _SLOTS
        self._requests = 0
        self._restart = RestartPause()
        self._closed = False
        self._share_device_frames = True
        self._polygons = _ChildPolygonWorkers() if config.polygon_processes else None
        self.device_peak_mb: float | None = None
        """The most GPU memory the child's PyTorch has held, as of its last answer (None on the CPU)."""
        self.device_reserved_bytes = 0.0
        """GPU memory the child's PyTorch holds now, as of its last answer (`vap_gpu_memory_bytes` adds it)."""
        self.replacements = 0
        self._child: _Child | None = _Child(0)
        self._child.connection.send(self._load_message)
        loaded = self._wait_loaded(self._child, _LOAD_S, first=True)
        self.name, self.task, self.runtime, self.labels, self.precision = loaded

    @property
    def pids(self) -> list[int]:
        child = self._child
        return [] if child is None else [child.process.pid]

    @property
    def polygon_pool(self) -> _ChildPolygonWorkers | None:
        """Polygons are traced in the child, in its own workers when `model.polygon_processes` asks for some."""
        return self._polygons

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        """Warms the child up, and every replacement too before it takes a batch: on a GPU a cold one would
        capture its CUDA graphs mid-stream."""
        self._load_message = (*self._load_message[:-1], list(batch_sizes))
        child = self._ready_child()
        child.connection.send(("warmup", list(batch_sizes)))
        if not child.connection.poll(_LOAD_S) or child.connection.recv() != ("warm",):
            raise InferenceProcessFailed("the inference process did not finish its warm-up")

    def submit(self, frames: Sequence[Frame]) -> _Request:
        child = self._ready_child()
        images = [self._image_to_send(frame.image) for frame in frames]
        try:
            slot = self._free_slots.get(timeout=_REPLY_S)
        except queue.Empty:
            raise InferenceProcessFailed("no inbox came free: batches were submitted and never collected") from None
        with self._lock:
            self._requests += 1
            request = _Request(self._requests, frames, slot, child.generation)
        try:
            parts = self._copy_in(child, slot, images)
            child.connection.send(("infer", request.number, slot, parts))
        except (OSError, ValueError) as error:
            self._release(request)
            self._replace(child, f"cannot be written to ({error})")
            raise InferenceProcessFailed("the inference process went while a batch was sent to it") from error
        except RuntimeError as error:  # pickling a CUDA IPC handle failed: nothing was sent
            self._release(request)
            self._share_device_frames = False
            log.warning("frames on %s cannot be shared with the inference process (%s); from now on they are "
                        "copied to the host for it", self.device, error)
            raise InferenceProcessFailed("a batch's frames could not be shared with the inference process") from error
        return request

    def collect(self, pending: _Request) -> list[FrameResult]:
        try:
            answer = self._answer_to(pending)
        finally:
            self._release(pending)
        if answer[0] == "failed":
            raise InferenceProcessFailed(f"the inference process failed on the batch:\n{answer[2]}")
        _, _, packed, classes, inference_ms, timings, polygon_workers, device_memory = answer
        if device_memory is not None:
            self.device_peak_mb, self.device_reserved_bytes = device_memory
        if self._polygons is not None and polygon_workers is not None:
            self._polygons.reported(*polygon_workers)
        finished = time.monotonic()
        return [FrameResult(frame=frame, task=self.task, detections=detections, classes=frame_classes,
                            labels=self.labels, inference_ms=inference_ms, inferred_monotonic=finished,
                            timings=timings)
                for frame, detections, frame_classes in zip(pending.frames, unpack_detections(packed), classes,
                                                            strict=True)]

    def close(self) -> None:
        """Waits up to `QUIT_WAIT_S` for the batches in flight to be collected (the worker's finisher may still
        be on one when its inference thread closes the detector), then stops the child."""
        deadline = time.monotonic() + QUIT_WAIT_S
        while self._free_slots.qsize() < _SLOTS and self._child is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            self._closed = True
            child, self._child = self._child, None
        if child is not None:
            child.stop(QUIT_WAIT_S)
        for slot in range(_SLOTS):
            self._close_inbox(slot)

    def _image_to_send(self, image: Image) -> Image:
        """A host image as a contiguous array to copy; a frame a GPU decoded (`decoder: cuda`) as it is, to go
        as a CUDA IPC handle, or copied down when sharing it failed once."""
        if isinstance(image, np.ndarray):
            return np.ascontiguousarray(image)
        if image.is_cuda and self._share_device_frames:
            import torch.multiprocessing  # noqa: F401  # teaches the socket's pickler to send CUDA IPC handles

            return image
        return np.ascontiguousarray(host_image(image))

    def _copy_in(self, child: _Child, slot: int, images: list[Image]) -> list[tuple[int, int, int] | Image]:
        """What the child is sent for each image: where its pixels are in the slot's inbox, or the device
        tensor itself."""
        on_host = [image for image in images if isinstance(image, np.ndarray)]
        inbox = self._inbox_for(child, slot, sum(image.nbytes for image in on_host)) if on_host else None
        parts: list[tuple[int, int, int] | Image] = []
        offset = 0
        for image in images:
            if not isinstance(image, np.ndarray):
                parts.append(image)
                continue
            assert inbox is not None
            np.frombuffer(inbox, np.uint8, image.nbytes, offset)[:] = image.reshape(-1)
            parts.append((offset, int(image.shape[0]), int(image.shape[1])))
            offset += image.nbytes
        return parts

    def _inbox_for(self, child: _Child, slot: int, needed: int) -> mmap.mmap:
        """The slot's memory, `needed` bytes at least, mapped by the child too. The slot is free, so neither the
        child nor a batch still reads its old memory."""
        inbox = self._inboxes[slot]
        if inbox is None or len(inbox) < needed:
            self._close_inbox(slot)
            self._descriptors[slot], inbox = new_inbox(f"vap-inference-inbox-{slot}", max(2 * needed, _SMALLEST_INBOX))
            self._inboxes[slot] = inbox
        if child.inboxes[slot] is not inbox:
            send_inbox(child.connection, child.process.pid, ("inbox", slot, len(inbox)), self._descriptors[slot])
            child.inboxes[slot] = inbox
        return inbox

    def _close_inbox(self, slot: int) -> None:
        inbox, descriptor = self._inboxes[slot], self._descriptors[slot]
        self._inboxes[slot], self._descriptors[slot] = None, -1
        if inbox is not None:
            with contextlib.suppress(BufferError):
                inbox.close()
        if descriptor >= 0:
            os.close(descriptor)

    def _release(self, request: _Request) -> None:
        self._free_slots.put(request.slot)

    def _answer_to(self, request: _Request) -> tuple[Any, ...]:
        """The child's answer to `request`; answers come in order, so earlier ones (of batches already failed
        here) are read past."""
        child = self._child
        if child is None or child.generation != request.child:
            raise InferenceProcessFailed("the inference process that had the batch was replaced")
        deadline = time.monotonic() + _REPLY_S
        try:
            while time.monotonic() < deadline:
                if not child.connection.poll(min(0.5, max(0.0, deadline - time.monotonic()))):
                    if child.process.poll() is not None:
                        break
                    continue
                answer = child.connection.recv()
                if answer[1] == request.number:
                    return tuple(answer)
            why = (f"exited with status {child.process.returncode}" if child.process.poll() is not None
                   else f"did not answer within {_REPLY_S:.0f} s")
        except (EOFError, OSError) as error:
            why = f"closed its socket ({error})"
        self._replace(child, why)
        raise InferenceProcessFailed(f"the inference process {why}; its batches are lost")

    def _ready_child(self) -> _Child:
        """The child, loaded. While it is being replaced, a batch waits up to `_READY_WAIT_S` for the successor
        to be due, start and load, and fails after that: the streams lose a batch a second at most meanwhile."""
        deadline = time.monotonic() + _READY_WAIT_S
        with self._lock:
            if self._closed:
                raise InferenceProcessFailed("the detector is closed")
            child, due_in = self._child, self._restart.start_after - time.monotonic()
        if child is None:
            time.sleep(max(0.0, min(due_in, _READY_WAIT_S)))
            with self._lock:
                if self._child is None and not self._closed and self._restart.due:
                    self._child = _Child(self.replacements)
                    self._child.connection.send(self._load_message)
                child = self._child
            if child is None:
                raise InferenceProcessFailed(f"the inference process is being replaced; the next starts in "
                                             f"{max(0.0, self._restart.start_after - time.monotonic()):.0f} s")
        if not child.ready:
            self._wait_loaded(child, max(0.0, deadline - time.monotonic()), first=False)
        return child

    def _wait_loaded(self, child: _Child, wait_s: float, first: bool) -> tuple[Any, ...]:
        """What the child says it loaded. The first child's failure to load is the pipeline's, raised as loading
        in this process would raise it; a replacement's only delays the next batches."""
        try:
            if child.connection.poll(wait_s):
                answer = child.connection.recv()
                if answer[0] == "loaded":
                    child.ready = True
                    with self._lock:
                        self._restart.ready()
                    warmed = self._load_message[-1]
                    log.info("the model runs in process %d on %s%s", child.process.pid, self.device,
                             f", warmed up for batches of {', '.join(map(str, warmed))}" if warmed else "")
                    return tuple(answer[1:])
                if first:
                    child.stop(0.0)
                    _raise_load_failure(answer)
                why = f"could not load the model ({answer[-1]})"
            elif child.process.poll() is not None:
                why = f"exited with status {child.process.returncode}"
            elif time.monotonic() - child.started < _LOAD_S:
                raise InferenceProcessFailed("the inference process is still loading the model")
            else:
                why = f"did not load the model within {_LOAD_S:.0f} s"
        except (EOFError, OSError) as error:
            why = f"closed its socket ({error})"
        self._replace(child, why)
        raise InferenceProcessFailed(f"the inference process {why}")

    def _replace(self, child: _Child, why: str) -> None:
        """Stops `child` unless it was already replaced; the next batch starts its successor once due."""
        with self._lock:
            if self._child is not child:
                return
            self._child = None
            self.replacements += 1
            pause = self._restart.replaced()
            if self._polygons is not None:
                self._polygons.child_gone()
        log.warning("the inference process on %s (pid %d) %s; its batches are lost, and a new one starts in %.0f s",
                    self.device, child.process.pid, why, pause)
        child.stop(0.0)


def _raise_load_failure(answer: tuple[Any, ...]) -> None:
    """The child's load failure as the error loading in vap's process raises, so the CLI answers the same."""
    if answer[0] != "load failed":
        raise InferenceProcessFailed(f"the inference process answered {answer[0]!r} to loading the model")
    kind, detail = answer[1], answer[2]
    if kind == "config":
        raise ConfigError(detail)
    if kind == "mismatch":
        raise ModelMismatch(detail)
    raise RuntimeError(detail)


def serve_descriptor(descriptor: int) -> None:
    """The child's entry point (SIGINT and SIGTERM are ignored: `bootstrap_for`)."""
    from pipeline.inference.offline import keep_model_libraries_offline

    keep_model_libraries_offline()
    _Server(Connection(descriptor)).serve()
    os._exit(0)  # nothing to flush, and tearing down the model library's interpreter takes a second


class _Server:
    """The child: its main thread reads requests and queues each batch's device work; a second thread waits for
    it and answers, so the next batch is letterboxed and launched while this one finishes, as in vap's
    process (`InferenceWorker`)."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._send_lock = threading.Lock()
        self._inboxes: list[mmap.mmap | None] = [None] * _SLOTS
        self._submitted: queue.Queue[tuple[int, Any, BaseException | None] | None] = queue.Queue(maxsize=1)
        self._detector: Any = None

    def serve(self) -> None:
        finisher = threading.Thread(target=self._answer_batches, name="inference-finish", daemon=True)
        try:
            message: Any = self._connection.recv()
            if message[0] != "load" or not self._load(*message[1:]):
                return
            finisher.start()
            while True:
                message = self._connection.recv()
                if message[0] == "infer":
                    self._submit(*message[1:])
                elif message[0] == "inbox":
                    self._map_inbox(message[1], message[2])
                elif message[0] == "warmup":
                    self._detector.warmup(message[1])
                    self._send(("warm",))
                else:
                    return
        except (EOFError, OSError):
            return
        finally:
            if finisher.is_alive():
                with contextlib.suppress(queue.Full):
                    self._submitted.put(None, timeout=5.0)  # the finisher may still be in a batch
                finisher.join(5.0)

    def _load(self, config: ModelConfig, device: str, max_batch: int, urls: list[str], warmup: list[int]) -> bool:
        from pipeline.inference.detector import UltralyticsDetector
        from pipeline.inference.devices import use_device_in_this_thread

        try:
            use_device_in_this_thread(device)
            self._detector = UltralyticsDetector(config, device, max_batch, calibration_urls=urls)
            if warmup:
                self._detector.warmup(warmup)
        except ConfigError as error:
            self._send(("load failed", "config", error.problems))
            return False
        except ModelMismatch as error:
            self._send(("load failed", "mismatch", str(error)))
            return False
        except Exception as error:
            self._send(("load failed", "other", f"{error}\n{traceback.format_exc()}"))
            return False
        detector = self._detector
        self._send(("loaded", detector.name, detector.task, detector.runtime, detector.labels,
                    getattr(detector, "precision", "")))
        return True

    def _map_inbox(self, slot: int, size: int) -> None:
        old = self._inboxes[slot]
        self._inboxes[slot] = receive_inbox(self._connection, size)
        if old is not None:
            with contextlib.suppress(BufferError):
                old.close()

    def _submit(self, number: int, slot: int, parts: list[tuple[int, int, int] | Image]) -> None:
        now = time.monotonic()
        stamp = datetime.now(timezone.utc)
        try:
            frames = [Frame("batch", index, None, stamp, now, self._image(slot, part))
                      for index, part in enumerate(parts)]
            self._submitted.put((number, self._detector.submit(frames), None))
        except Exception as error:
            self._submitted.put((number, None, error))

    def _image(self, slot: int, part: tuple[int, int, int] | Image) -> Image:
        """A view of the pixels in the slot's inbox, or the tensor a GPU decoded, received as a CUDA IPC handle."""
        if not isinstance(part, tuple):
            return part
        offset, height, width = part
        inbox = self._inboxes[slot]
        assert inbox is not None, f"no inbox for slot {slot}"
        return np.frombuffer(inbox, np.uint8, height * width * 3, offset).reshape(height, width, 3)

    def _answer_batches(self) -> None:
        from pipeline.inference.devices import use_device_in_this_thread

        use_device_in_this_thread(self._detector.device)
        while (item := self._submitted.get()) is not None:
            number, pending, error = item
            try:
                if error is not None:
                    raise error
                results = self._detector.collect(pending)
                answer: tuple[Any, ...] = (
                    "inferred", number, pack_detections([result.detections for result in results]),
                    [result.classes for result in results], results[0].inference_ms if results else 0.0,
                    results[0].timings if results else None, self._polygon_workers(), self._device_memory())
            except Exception:
                answer = ("failed", number, traceback.format_exc())
            try:
                self._send(answer)
            except (OSError, ValueError):
                os._exit(0)  # the pipeline is gone, and the main thread may be blocked handing over a batch

    def _device_memory(self) -> tuple[float, float] | None:
        """The most GPU memory PyTorch has held here (MB), and what it holds now (bytes); None on the CPU."""
        device = self._detector.device
        if not device.startswith("cuda"):
            return None
        import torch

        return float(torch.cuda.max_memory_allocated(device)) / 2**20, float(torch.cuda.memory_reserved(device))

    def _polygon_workers(self) -> tuple[list[int], int] | None:
        pool = self._detector.polygon_pool
        return None if pool is None else (pool.pids, pool.replacements)

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._connection.send(message)
