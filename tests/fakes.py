"""Fakes for unit tests of one class: frames (blank, or rendered scenes), a decoder, a detector and a Kafka
producer."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.frames import Detections, Frame, FrameResult
from pipeline.tools.synth.world import SceneSpec, render_scene


def make_frame(stream_id: str, frame_id: int, width: int = 32, height: int = 24) -> Frame:
    return Frame(
        stream_id=stream_id,
        frame_id=frame_id,
        pts_ms=frame_id * 100.0,
        captured_at=datetime.now(timezone.utc),
        captured_monotonic=time.monotonic(),
        image=np.zeros((height, width, 3), np.uint8),
    )


def scene_frames(width: int, height: int, count: int, seed: int) -> list[Frame]:
    """Frames of the synthetic shapes world, which the bundled model detects."""
    scene = render_scene(SceneSpec(width=width, height=height, n_frames=count, seed=seed))
    return [replace(make_frame(f"s{seed}", index), image=image) for index, (image, _) in enumerate(scene)]


def make_result(frame: Frame) -> FrameResult:
    return FrameResult(frame=frame, task="detect", detections=Detections.empty(), labels={})


class FakeSource:
    """Gives `frames` images then fails or ends; `open_results` scripts failed connection attempts."""

    def __init__(self, frames: int, open_results: Sequence[bool] = (True,), fps: float = 10.0) -> None:
        self._frames = frames
        self._open_results = list(open_results)
        self._fps = fps
        self._read = 0
        self.opened = 0

    def open(self) -> bool:
        result = self._open_results.pop(0) if self._open_results else True
        self.opened += 1
        return result

    def read(self) -> npt.NDArray[np.uint8] | None:
        if self._read >= self._frames:
            return None
        self._read += 1
        return np.full((24, 32, 3), self._read % 255, np.uint8)

    def position_ms(self) -> float | None:
        return (self._read - 1) * 1000 / self._fps

    def frame_rate(self) -> float | None:
        return self._fps

    def close(self) -> None:
        self._read = 0


class FakeFuture:
    """Like kafka-python's future: a callback added after completion runs at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Any] = []
        self._errbacks: list[Any] = []
        self._outcome: tuple[bool, Any] | None = None

    def add_callback(self, fn: Any, *args: Any) -> FakeFuture:
        return self._add(True, fn, args)

    def add_errback(self, fn: Any, *args: Any) -> FakeFuture:
        return self._add(False, fn, args)

    def _add(self, on_success: bool, fn: Any, args: tuple[Any, ...]) -> FakeFuture:
        with self._lock:
            if self._outcome is None:
                (self._callbacks if on_success else self._errbacks).append((fn, args))
                return self
            succeeded, value = self._outcome
        if succeeded == on_success:
            fn(*args, value)
        return self

    def _complete(self, succeeded: bool, value: Any) -> None:
        with self._lock:
            self._outcome = (succeeded, value)
            waiting = self._callbacks if succeeded else self._errbacks
        for fn, args in waiting:
            fn(*args, value)

    def succeed(self) -> None:
        self._complete(True, object())

    def fail(self, error: Exception) -> None:
        self._complete(False, error)


class FakeProducer:
    """Acknowledges at once unless `available` is cleared; then every send fails like a dead broker."""

    def __init__(self, available: threading.Event) -> None:
        self.available = available
        self.sent: list[tuple[bytes, bytes]] = []
        self.closed = False

    def send(self, topic: str, value: bytes, key: bytes, headers: list[tuple[str, bytes]]) -> FakeFuture:
        future = FakeFuture()
        if not self.available.is_set():
            raise TimeoutError("metadata not available")
        self.sent.append((key, value))
        threading.Timer(0.001, future.succeed).start()
        return future

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


class GarbageThenGoodSource(FakeSource):
    """A decoder that starts with `garbage` unusable frames, like a stream joining between key frames."""

    def __init__(self, garbage: int, frames: int) -> None:
        super().__init__(frames=frames)
        self._garbage = garbage

    def read(self) -> npt.NDArray[np.uint8] | None:
        from pipeline.sources.source import InvalidFrame

        if self._garbage > 0:
            self._garbage -= 1
            raise InvalidFrame("no key frame yet")
        return super().read()
