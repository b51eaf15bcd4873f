"""Decoding with OpenCV: files, HTTP streams (MJPEG) and local cameras, with open and read timeouts.

None of these needs options for FFmpeg: RTSP cameras, which do, are read with PyAV (`pipeline.sources.pyav`),
so nothing here touches OpenCV's process-wide `OPENCV_FFMPEG_CAPTURE_OPTIONS`.
"""

from __future__ import annotations

import logging
import os

import cv2
import numpy as np
import numpy.typing as npt

from pipeline.config import StreamConfig
from pipeline.sources.source import InvalidFrame

log = logging.getLogger(__name__)


def decoder_threads(streams: int) -> int:
    """FFmpeg decoder threads per stream: its default, one per core for every stream, puts hundreds of
    threads on a host with many cameras and starves the inference thread; share the cores instead."""
    return max(1, (os.cpu_count() or 1) // max(1, streams))


class OpenCvSource:
    """cv2.VideoCapture with open and read timeouts (FFmpeg backend for files and URLs)."""

    def __init__(self, config: StreamConfig, threads: int = 0) -> None:
        self._config = config
        self._threads = threads
        self._capture: cv2.VideoCapture | None = None

    def open(self) -> bool:
        config = self._config
        if config.kind == "camera":
            # Local devices: V4L2 takes no open parameters, and OpenCV then refuses to open at all.
            device = int(config.url) if config.url.isdigit() else config.url
            return self._opened(cv2.VideoCapture(device, cv2.CAP_ANY))
        timeouts = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, config.open_timeout_ms,
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(config.stall_timeout_s * 1000),
        ]
        if self._threads > 0:
            timeouts += [cv2.CAP_PROP_N_THREADS, self._threads]
        target = str(config.file_path) if config.kind == "file" else config.url
        return self._opened(cv2.VideoCapture(target, cv2.CAP_FFMPEG, timeouts))

    def _opened(self, capture: cv2.VideoCapture) -> bool:
        if not capture.isOpened():
            capture.release()
            return False
        self._capture = capture
        return True

    def read(self) -> npt.NDArray[np.uint8] | None:
        if self._capture is None:
            return None
        ok, image = self._capture.read()
        if not ok:
            return None
        if image is None or image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
            raise InvalidFrame(f"decoder returned {None if image is None else image.shape}")
        decoded: npt.NDArray[np.uint8] = image
        return decoded

    def position_ms(self) -> float | None:
        if self._capture is None:
            return None
        position = float(self._capture.get(cv2.CAP_PROP_POS_MSEC))
        return position if position > 0 or self._config.kind == "file" else None

    def frame_rate(self) -> float | None:
        if self._capture is None:
            return None
        fps = float(self._capture.get(cv2.CAP_PROP_FPS))
        return fps if 0 < fps < 1000 else None

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None
