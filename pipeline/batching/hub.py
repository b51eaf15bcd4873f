"""Per-stream frame buffers and the batcher that takes from them fairly.

All buffers sit behind one condition variable: readers notify it, and the batcher waits on it for
"any stream has a frame" without polling. A slow or dead stream therefore never holds up a batch.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.frames import Batch, Frame


class OverflowPolicy(enum.Enum):
    """What a full per-stream buffer does with a new frame."""

    DROP_OLDEST = "drop_oldest"  # live sources: freshest frame wins
    WAIT = "wait"  # files: the reader waits, nothing is lost


@dataclass
class _StreamBuffer:
    frames: deque[tuple[float, Frame]]  # with when each frame entered the buffer (monotonic)
    capacity: int
    policy: OverflowPolicy
    max_age_s: float | None
    worker: int = 0


class FrameHub:
    """Bounded per-stream buffers with round-robin batch taking."""

    def __init__(self, on_stale: Callable[[Frame], None] | None = None, workers: int = 1) -> None:
        """`workers`: how many inference workers take batches. Each stream belongs to one of them, so its
        frames are never inferred on two devices at once and its results stay in order."""
        self._on_stale = on_stale
        self._workers = max(1, workers)
        self._condition = threading.Condition()
        self._buffers: dict[str, _StreamBuffer] = {}
        self._next_stream: dict[int, int] = {}  # per worker: a shared turn would fix each worker's first stream
        self._in_flight: dict[int, Batch] = {}  # by id: a batch holds arrays, so it cannot be a dict key

    def set_workers(self, workers: int) -> None:
        """Set before streams are added; streams already added keep their worker."""
        with self._condition:
            self._workers = max(1, workers)

    def add_stream(
        self, stream_id: str, capacity: int, policy: OverflowPolicy, max_age_s: float | None = None,
        worker: int | None = None,
    ) -> None:
        """`max_age_s`: a frame older than this when a batch takes it is dropped as stale instead. `worker`: the
        one that must infer this stream (its frames are decoded on that worker's GPU); else the least loaded."""
        with self._condition:
            if worker is None or not 0 <= worker < self._workers:
                load = [0] * self._workers
                for buffer in self._buffers.values():
                    load[buffer.worker] += 1
                worker = load.index(min(load))
            self._buffers[stream_id] = _StreamBuffer(deque(), capacity, policy, max_age_s, worker)

    def remove_stream(self, stream_id: str) -> list[Frame]:
        """The frames still waiting in the stream's buffer, for the caller to count."""
        with self._condition:
            buffer = self._buffers.pop(stream_id, None)
            self._condition.notify_all()
            return [] if buffer is None else [frame for _, frame in buffer.frames]

    def slot(self, stream_id: str) -> object | None:
        """The stream's buffer as it is now, for `put`: a reader of a removed stream must not feed a new
        stream added under the same id."""
        with self._condition:
            return self._buffers.get(stream_id)

    def put(self, frame: Frame, stop: threading.Event, slot: object | None = None) -> tuple[Frame, str] | None:
        """Add a frame; returns the frame dropped instead, with the reason, if any.

        With the WAIT policy this blocks until there is room, the stream is removed, or `stop` is set; a
        frame refused because of `stop` is dropped (shutdown). With `slot` (from `slot()`), a frame for a
        buffer that has since been removed or replaced is refused (stream_removed).
        """
        with self._condition:
            buffer = self._buffers.get(frame.stream_id)
            if buffer is None or (slot is not None and buffer is not slot):
                return frame, "stream_removed"
            while len(buffer.frames) >= buffer.capacity:
                if buffer.policy is OverflowPolicy.DROP_OLDEST:
                    _, dropped = buffer.frames.popleft()
                    buffer.frames.append((time.monotonic(), frame))
                    self._condition.notify_all()
                    return dropped, "queue_full"
                if stop.is_set():
                    return frame, "shutdown"
                if self._buffers.get(frame.stream_id) is not buffer:
                    return frame, "stream_removed"
                self._condition.wait(timeout=0.1)
            buffer.frames.append((time.monotonic(), frame))
            self._condition.notify_all()
            return None

    def depth(self) -> int:
        with self._condition:
            return sum(len(buffer.frames) for buffer in self._buffers.values())

    def drained(self) -> bool:
        """No frame waits in a buffer and every taken batch was reported done."""
        with self._condition:
            return not self._in_flight and not self._any_frame()

    def in_flight(self) -> int:
        """Frames taken in batches not yet reported done."""
        with self._condition:
            return sum(len(batch.frames) for batch in self._in_flight.values())

    def abandon_in_flight(self) -> list[Frame]:
        """The frames of every batch not yet reported done, for a stop that gave up waiting on a stuck worker:
        the caller counts them, and a late `batch_done` for one of those batches changes nothing."""
        with self._condition:
            frames = [frame for batch in self._in_flight.values() for frame in batch.frames]
            self._in_flight.clear()
            self._condition.notify_all()
            return frames

    def discard_waiting(self) -> list[Frame]:
        """Empties every buffer, for a stop whose drain deadline passed: the caller counts what it gets."""
        with self._condition:
            frames = [frame for buffer in self._buffers.values() for _, frame in buffer.frames]
            for buffer in self._buffers.values():
                buffer.frames.clear()
            self._condition.notify_all()
            return frames

    def batch_done(self, batch: Batch) -> None:
        with self._condition:
            self._in_flight.pop(id(batch), None)

    def take_batch(
        self, max_batch: int, max_wait_s: float, max_per_stream: int, poll_s: float = 0.1, worker: int = 0
    ) -> Batch | None:
        """Wait up to `poll_s` for a first frame, then fill the batch until its oldest frame has waited
        `max_wait_s` in the hub: counted from the batcher's wake-up instead, a frame that arrived while the
        batcher was busy would wait up to twice as long.

        Streams are visited round-robin, starting one further each batch, and no stream gives more
        than `max_per_stream` frames to one batch. Returns None when no usable frame arrived within
        `poll_s`, so the caller can check its stop event. The caller reports `batch_done` afterwards.
        Only the streams that belong to `worker` are visited.
        """
        taken: list[Frame] = []
        per_stream: dict[str, int] = {}
        with self._condition:
            if not self._condition.wait_for(lambda: self._any_frame(worker), timeout=poll_s):
                return None
            woke = time.monotonic()
            first_arrival: float | None = None
            while True:
                oldest = self._take_round_robin(taken, per_stream, max_batch, max_per_stream, worker)
                if oldest is not None and (first_arrival is None or oldest < first_arrival):
                    first_arrival = oldest
                # While every frame so far was stale, the wait counts from the wake-up, as for a new frame.
                remaining = (woke if first_arrival is None else first_arrival) + max_wait_s - time.monotonic()
                if (len(taken) >= max_batch or remaining <= 0
                        or not self._can_grow(per_stream, max_per_stream, worker)):
                    break
                self._condition.wait(timeout=remaining)
            self._next_stream[worker] = self._next_stream.get(worker, 0) + 1
            self._condition.notify_all()
            if not taken:
                return None
            batch = Batch(frames=tuple(taken), formed_monotonic=time.monotonic())
            self._in_flight[id(batch)] = batch
        return batch

    def _any_frame(self, worker: int | None = None) -> bool:
        return any(buffer.frames for buffer in self._buffers.values() if worker is None or buffer.worker == worker)

    def _can_grow(self, per_stream: dict[str, int], max_per_stream: int, worker: int) -> bool:
        return any(per_stream.get(stream_id, 0) < max_per_stream
                   for stream_id, buffer in self._buffers.items() if buffer.worker == worker)

    def _take_round_robin(
        self, taken: list[Frame], per_stream: dict[str, int], max_batch: int, max_per_stream: int, worker: int
    ) -> float | None:
        """When the oldest of the frames taken now entered the hub; None when none was taken."""
        stream_ids = [stream_id for stream_id, buffer in self._buffers.items() if buffer.worker == worker]
        oldest: float | None = None
        if not stream_ids:
            return oldest
        start = self._next_stream.get(worker, 0) % len(stream_ids)
        order = stream_ids[start:] + stream_ids[:start]
        now = time.monotonic()
        progressed = True
        while progressed and len(taken) < max_batch:
            progressed = False
            for stream_id in order:
                buffer = self._buffers[stream_id]
                if len(taken) >= max_batch:
                    break
                if buffer.frames and per_stream.get(stream_id, 0) < max_per_stream:
                    arrived, frame = buffer.frames.popleft()
                    progressed = True
                    if buffer.max_age_s is not None and now - frame.captured_monotonic > buffer.max_age_s:
                        if self._on_stale is not None:
                            self._on_stale(frame)
                        continue
                    taken.append(frame)
                    per_stream[stream_id] = per_stream.get(stream_id, 0) + 1
                    oldest = arrived if oldest is None else min(oldest, arrived)
        return oldest
