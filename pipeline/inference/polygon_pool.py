"""Mask outlines traced in worker processes (`model.polygon_processes`), for batches whose masks a GPU built.

Why: a GPU sends each mask's window around its box back to the host (`pack_mask_windows`), and turning the
windows into polygons is host work, 30-80 us a detection of Python and OpenCV on the finisher thread (measured
on the bench's scenes). At 1,800 frames a second with five detections each, that is 30-70% of a core spent
holding the interpreter's lock, which the inference thread needs to launch the next batch. Here the finisher
hands a batch's windows to worker processes, split between them by frame, and waits on their sockets holding
no lock.

The pool speeds things up but is never needed: it starts its workers on the first batch with mask windows (a
CPU host, whose masks never take that form, starts none), and a batch no worker can take (while they start,
after one died, once the pool is closed) is traced on the finisher thread as before, with the same function.
A worker that dies, is not ready within `_START_S` or does not answer within `_REPLY_S` is replaced, after a
pause that doubles while its replacements die before they are ready.

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
import itertools
import logging
import mmap
import os
import threading
import time
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.children import end_child, start_child
from pipeline.frames import Detections
from pipeline.inference.postprocess import BatchDetections, frame_detections, split_points, window_bounds
from pipeline.inference.preprocess import Letterbox

log = logging.getLogger(__name__)

_REPLY_S = 2.0  # a batch takes milliseconds; the stop budget gives a stage 1.5 s
_QUIT_WAIT_S = 1.0
_SMALLEST_INBOX = 1 << 20
_START_S = 60.0  # its imports take 2-3 s; a worker not ready by then is stuck
_FIRST_PAUSE_S = 1.0
_LONGEST_PAUSE_S = 60.0
_WORKER_BOOTSTRAP = (
    "import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
    "from pipeline.inference.polygon_pool import serve_descriptor; serve_descriptor(int(sys.argv[2]))"
)

_HostBatch = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.uint8]]


class _PolygonWorker:
    """A worker process and its inbox: memory both map (a memfd, passed by descriptor) that a batch's mask pixels
    are copied into. Sent through the socket instead, they cost the finisher 0.3-0.5 ms more per batch of 16
    frames with 44 masks (1.2-1.6 ms in all against 0.9-1.1)."""

    def __init__(self) -> None:
        self.process, self.connection = start_child(_WORKER_BOOTSTRAP)
        self.started = time.monotonic()
        self.ready = False
        self._inbox: mmap.mmap | None = None

    def send_batch(self, batch: _HostBatch, plan: list[Letterbox]) -> None:
        rows, image_index, windows, pixels = batch
        if self._inbox is None or len(self._inbox) < pixels.nbytes:
            self._new_inbox(max(2 * pixels.nbytes, _SMALLEST_INBOX))
        assert self._inbox is not None
        np.frombuffer(self._inbox, np.uint8, pixels.nbytes)[:] = pixels
        self.connection.send(("trace", rows, image_index, windows, pixels.nbytes, plan))

    def _new_inbox(self, size: int) -> None:
        descriptor = os.memfd_create("vap-polygon-inbox")
        try:
            os.ftruncate(descriptor, size)
            inbox = mmap.mmap(descriptor, size)
            self.connection.send(("inbox", size))
            send_handle(self.connection, descriptor, self.process.pid)
        finally:
            os.close(descriptor)
        self._close_inbox()
        self._inbox = inbox

    def _close_inbox(self) -> None:
        if self._inbox is not None:
            with contextlib.suppress(BufferError):
                self._inbox.close()
            self._inbox = None

    def check_ready(self) -> bool:
        """Whether the worker has said it is ready; raises EOFError or OSError when it is gone."""
        if not self.ready and self.connection.poll(0):
            self.ready = self.connection.recv() == ("ready",)
        return self.ready and self.process.poll() is None

    def stop(self, wait_s: float) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.connection.send(("quit",))
        end_child(self.process, wait_s)
        self.connection.close()
        self._close_inbox()


class PolygonPool:
    """A detector's polygon workers; `frame_detections` is a drop-in for the function of that name. One caller
    at a time: a second waits for the first."""

    def __init__(self, processes: int) -> None:
        self._workers: list[_PolygonWorker | None] = [None] * processes
        self._start_after = [0.0] * processes
        self._pause_s = [_FIRST_PAUSE_S] * processes
        self._lock = threading.Lock()
        self._closed = False
        self.batches_in_workers = 0
        self.batches_here = 0

    @property
    def pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers if worker is not None]

    @property
    def ready_workers(self) -> int:
        return sum(1 for worker in self._workers if worker is not None and worker.ready)

    def frame_detections(self, found: BatchDetections, plan: Sequence[Letterbox]) -> list[Detections]:
        if found.mask_windows is not None and found.mask_pixels is not None and len(found.rows):
            with self._lock:
                ready = [] if self._closed else self._ready_workers()
                if ready:
                    self.batches_in_workers += 1
                    return self._in_workers(_on_host(found), plan, ready)
        self.batches_here += 1
        return frame_detections(found, plan)

    def close(self) -> None:
        """Waits for a batch in the workers, then stops them; later batches are traced by their caller."""
        with self._lock:
            self._closed = True
            workers = [worker for worker in self._workers if worker is not None]
            self._workers = [None] * len(self._workers)
        deadline = time.monotonic() + _QUIT_WAIT_S
        for worker in workers:
            worker.stop(max(0.0, deadline - time.monotonic()))

    def _ready_workers(self) -> list[tuple[int, _PolygonWorker]]:
        """The workers that can take a part of a batch now; starts the ones that are missing and due."""
        ready = []
        for index, worker in enumerate(self._workers):
            if worker is None:
                if time.monotonic() >= self._start_after[index]:
                    self._workers[index] = _PolygonWorker()
                continue
            try:
                if worker.check_ready():
                    self._pause_s[index] = _FIRST_PAUSE_S
                    ready.append((index, worker))
                elif worker.process.poll() is not None:
                    self._replace(index, f"exited with status {worker.process.returncode}")
                elif not worker.ready and time.monotonic() - worker.started > _START_S:
                    self._replace(index, f"was not ready {_START_S:.0f} s after it started")
            except (EOFError, OSError):
                self._replace(index, "closed its socket")
        return ready

    def _replace(self, index: int, why: str) -> None:
        worker = self._workers[index]
        if worker is None:
            return
        self._workers[index] = None
        pause = self._pause_s[index]
        self._start_after[index] = time.monotonic() + pause
        self._pause_s[index] = min(pause * 2, _LONGEST_PAUSE_S)
        log.warning("polygon worker %d (pid %d) %s; its batches are traced in the pipeline's process until a new "
                    "one starts in %.0f s", index, worker.process.pid, why, pause)
        worker.stop(0.0)

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
                self._replace(index, "cannot be written to")
                index = -1
            parts.append((index, worker, part, plan[first:end]))
        traced: list[Detections] = []
        for index, worker, part, part_plan in parts:
            answer = None if index < 0 else self._answer(index, worker)
            traced.extend(frame_detections(_as_batch(*part), part_plan) if answer is None else answer)
        return traced

    def _answer(self, index: int, worker: _PolygonWorker) -> list[Detections] | None:
        """The worker's detections; None (and the worker replaced) when it does not give them."""
        try:
            if worker.connection.poll(_REPLY_S):
                answer = worker.connection.recv()
                if answer[0] == "traced":
                    return _unpacked(answer[1:])
                log.warning("polygon worker %d failed on a batch; tracing it here\n%s", index, answer[1])
                return None
            why = f"did not answer within {_REPLY_S:.0f} s"
        except (EOFError, OSError):
            why = "closed its socket"
        except Exception as error:  # an answer that does not unpickle
            why = f"sent an unreadable answer ({error})"
        self._replace(index, why)
        return None


def frame_groups(detections_per_frame: npt.NDArray[np.int64], groups: int) -> list[tuple[int, int]]:
    """Runs of whole frames, (first, end), at most `groups` of them, with about as many detections each: a
    batch's frames go to the workers in order, so their answers simply follow one another."""
    frames = len(detections_per_frame)
    if frames == 0:
        return []
    total = int(detections_per_frame.sum())
    if total == 0 or groups <= 1:
        return [(0, frames)]
    running = np.cumsum(detections_per_frame).tolist()
    edges = {0, frames}
    for group in range(1, groups):
        target = total * group / groups
        reaching = int(np.searchsorted(running, target, side="left")) + 1  # the first run of frames that gets there
        short = reaching - 1
        closer = short > 0 and target - running[short - 1] < running[reaching - 1] - target
        edges.add(short if closer else reaching)
    ordered = sorted(edge for edge in edges if 0 <= edge <= frames)
    return list(itertools.pairwise(ordered))


_Packed = tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.int64],
                npt.NDArray[np.int64], npt.NDArray[np.float32]]


def _packed(frames: list[Detections]) -> _Packed:
    """Frames' detections as six arrays, whatever their number: a list of them pickles every small array on its
    own, and on the finisher thread unpickling that took 170-200 us for 16 frames with 44 masks, against 60-110
    us for these arrays and the views made from them."""
    polygons = [polygon for detections in frames for polygon in detections.polygons if polygon is not None]
    return (np.array([[len(detections), len(detections.polygons)] for detections in frames], np.int64).reshape(-1, 2),
            np.concatenate([detections.boxes_xyxy for detections in frames] or [np.zeros((0, 4), np.float32)]),
            np.concatenate([detections.confidences for detections in frames] or [np.zeros(0, np.float32)]),
            np.concatenate([detections.class_ids for detections in frames] or [np.zeros(0, np.int64)]),
            np.array([len(polygon) for polygon in polygons], np.int64),
            np.concatenate(polygons or [np.zeros((0, 2), np.float32)]))


def _unpacked(packed: Sequence[Any]) -> list[Detections]:
    counts, boxes, confidences, class_ids, lengths, points = packed
    outlines = split_points(points, lengths.tolist())
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
    the pipeline goes."""
    import signal

    from pipeline.inference.offline import keep_model_libraries_offline

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pipeline stops its workers itself
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
                descriptor = recv_handle(connection)
                if inbox is not None:
                    inbox.close()
                inbox = mmap.mmap(descriptor, message[1])
                os.close(descriptor)
                continue
            if message[0] != "trace" or inbox is None:
                return
            rows, image_index, windows, pixel_bytes, plan = message[1:]
            try:
                batch = _as_batch(rows, image_index, windows, np.frombuffer(inbox, np.uint8, pixel_bytes))
                answer: Any = ("traced", *_packed(frame_detections(batch, plan)))
            except Exception:
                answer = ("failed", traceback.format_exc())
            del batch  # no view of the inbox may outlive it, or it cannot be replaced
            connection.send(answer)
