"""Mask outlines traced in worker processes (`model.polygon_processes`), for batches whose masks a GPU built.

Why: a GPU sends each mask's window around its box back to the host (`pack_mask_windows`), and turning the
windows into polygons is host work, 30-80 us a detection of Python and OpenCV on the finisher thread (measured
on the bench's scenes). At 1,800 frames a second with five detections each, that is 30-70% of a core spent
holding the interpreter's lock, which the inference thread needs to launch the next batch. Here the finisher
hands a batch's windows to worker processes, split between them by frame, and waits on their sockets holding
no lock.

The pool speeds things up but is never needed (`pipeline.children`): it starts its workers on the first
batch with mask windows (a CPU host, whose masks never take that form, starts none), and a batch no worker can
take is traced on the finisher thread as before, with the same function. A worker that does not answer within
`_REPLY_S` is replaced.

Protocol, over the socket each worker inherits (`pipeline.children`):
    worker -> pipeline, once its imports are done: ("ready",)
    pipeline -> worker: ("inbox", size), then the descriptor of the memory that a batch's mask pixels are copied
                        into, before the first batch and whenever a batch needs more
    pipeline -> worker: ("trace", rows, image_index, mask_windows, pixel bytes in the inbox, plan) for a run of
                        whole frames; answered by ("traced", those frames' `Detections` as a few arrays), or
                        ("failed", traceback)
    pipeline -> worker: ("quit",), or end of file when the pipeline goes
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.children import WorkerProcess, WorkerProcesses, bootstrap_for, new_inbox, receive_inbox, send_inbox
from pipeline.frames import Detections, frame_groups, pack_detections, unpack_detections
from pipeline.inference.postprocess import BatchDetections, frame_detections, window_bounds
from pipeline.inference.preprocess import Letterbox

log = logging.getLogger(__name__)

_REPLY_S = 2.0  # a batch takes milliseconds; the stop budget gives a stage 1.5 s
_SMALLEST_INBOX = 1 << 20
_WORKER_BOOTSTRAP = bootstrap_for("pipeline.inference.polygon_pool")

_HostBatch = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.uint8]]


class _PolygonWorker(WorkerProcess):
    """A worker process and its inbox: memory both map (a memfd, passed by descriptor) that a batch's mask pixels
    are copied into. Sent through the socket instead, they cost the finisher 0.3-0.5 ms more per batch of 16
    frames with 44 masks (1.2-1.6 ms in all against 0.9-1.1)."""

    def __init__(self) -> None:
        super().__init__(_WORKER_BOOTSTRAP)
        self._inbox: mmap.mmap | None = None

    def send_batch(self, batch: _HostBatch, plan: list[Letterbox]) -> None:
        rows, image_index, windows, pixels = batch
        if self._inbox is None or len(self._inbox) < pixels.nbytes:
            self._new_inbox(max(2 * pixels.nbytes, _SMALLEST_INBOX))
        assert self._inbox is not None
        np.frombuffer(self._inbox, np.uint8, pixels.nbytes)[:] = pixels
        self.connection.send(("trace", rows, image_index, windows, pixels.nbytes, plan))

    def _new_inbox(self, size: int) -> None:
        descriptor, inbox = new_inbox("vap-polygon-inbox", size)
        try:
            send_inbox(self.connection, self.process.pid, ("inbox", size), descriptor)
        finally:
            os.close(descriptor)
        self._close_inbox()
        self._inbox = inbox

    def _close_inbox(self) -> None:
        if self._inbox is not None:
            with contextlib.suppress(BufferError):
                self._inbox.close()
            self._inbox = None

    def stop(self, wait_s: float) -> None:
        super().stop(wait_s)
        self._close_inbox()


class PolygonPool:
    """A detector's polygon workers; `frame_detections` is a drop-in for the function of that name. One caller
    at a time: a second waits for the first."""

    def __init__(self, processes: int) -> None:
        self._workers = WorkerProcesses(processes, _PolygonWorker, "polygon worker",
                                        "its batches are traced in the pipeline's process")
        self.batches_in_workers = 0
        self.batches_here = 0

    @property
    def pids(self) -> list[int]:
        return self._workers.pids

    @property
    def replacements(self) -> int:
        """Workers that died or stopped answering and were replaced, since the pool started."""
        return self._workers.replacements

    @property
    def ready_workers(self) -> int:
        return self._workers.ready_count

    def frame_detections(self, found: BatchDetections, plan: Sequence[Letterbox]) -> list[Detections]:
        if found.mask_windows is not None and found.mask_pixels is not None and len(found.rows):
            with self._workers.lock:
                ready = self._workers.ready()
                if ready:
                    self.batches_in_workers += 1
                    return self._in_workers(_on_host(found), plan, ready)
        self.batches_here += 1
        return frame_detections(found, plan)

    def close(self) -> None:
        """Waits for a batch in the workers, then stops them; later batches are traced by their caller."""
        self._workers.close()

    def _in_workers(self, batch: _HostBatch, plan: Sequence[Letterbox],
                    ready: list[tuple[int, _PolygonWorker]]) -> list[Detections]:
        rows, image_index, windows, pixels = batch
        bounds = np.searchsorted(image_index, np.arange(len(plan) + 1))
        pixel_bounds = window_bounds(windows)
        parts = []
        for (first, end), (index, worker) in zip(frame_groups(np.diff(bounds), len(ready)), ready, strict=False):
            start, stop = int(bounds[first]), int(bounds[end])
            part = (rows[start:stop], image_index[start:stop] - first, windows[start:stop],
                    pixels[int(pixel_bounds[start]):int(pixel_bounds[stop])])
            try:
                worker.send_batch(part, list(plan[first:end]))
            except (OSError, ValueError):
                self._workers.replace(index, "cannot be written to")
                index = -1
            parts.append((index, worker, part, plan[first:end]))
        traced: list[Detections] = []
        for index, worker, part, part_plan in parts:
            answer = None if index < 0 else self._workers.answer(index, worker, _REPLY_S, _traced)
            traced.extend(frame_detections(_as_batch(*part), part_plan) if answer is None else answer)
        return traced


def _traced(answer: tuple[Any, ...]) -> list[Detections]:
    if answer[0] != "traced":
        raise ValueError(f"{answer[0]!r} is not an answer to a batch")
    return unpack_detections(answer[1:])


def _on_host(found: BatchDetections) -> _HostBatch:
    assert found.mask_windows is not None and found.mask_pixels is not None
    return (found.rows.numpy(), found.image_index.numpy(), found.mask_windows.numpy(), found.mask_pixels.numpy())


def _as_batch(rows: npt.NDArray[np.float32], image_index: npt.NDArray[np.int64], windows: npt.NDArray[np.int64],
              pixels: npt.NDArray[np.uint8]) -> BatchDetections:
    import torch

    return BatchDetections(torch.from_numpy(rows), torch.from_numpy(image_index), None,
                           mask_windows=torch.from_numpy(windows), mask_pixels=torch.from_numpy(pixels))


def serve_descriptor(descriptor: int) -> None:
    """The worker process's entry point: trace batches from the socket it inherited until told to quit or
    the pipeline goes (SIGINT and SIGTERM are ignored: `bootstrap_for`)."""
    from pipeline.inference.offline import keep_model_libraries_offline

    keep_model_libraries_offline()
    from ultralytics.data.converter import merge_multi_segment  # noqa: F401  # imported now, not mid-batch

    _serve(Connection(descriptor))
    os._exit(0)  # nothing to flush, and tearing down the model library's interpreter takes a second


def _serve(connection: Connection) -> None:
    inbox: mmap.mmap | None = None
    with contextlib.suppress(EOFError, OSError):
        connection.send(("ready",))
        while True:
            message: Any = connection.recv()
            if message[0] == "inbox":
                if inbox is not None:
                    inbox.close()
                inbox = receive_inbox(connection, message[1])
                continue
            if message[0] != "trace" or inbox is None:
                return
            rows, image_index, windows, pixel_bytes, plan = message[1:]
            try:
                batch = _as_batch(rows, image_index, windows, np.frombuffer(inbox, np.uint8, pixel_bytes))
                answer: Any = ("traced", *pack_detections(frame_detections(batch, plan)))
            except Exception:
                answer = ("failed", traceback.format_exc())
            del batch  # no view of the inbox may outlive it, or it cannot be replaced
            connection.send(answer)
