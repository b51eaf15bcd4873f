"""Decoding with OpenCV's FFmpeg backend: files, URLs and local cameras, with open and read timeouts."""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import urllib.parse

import cv2
import numpy as np
import numpy.typing as npt

from pipeline.config import StreamConfig, redact_url
from pipeline.sources.source import InvalidFrame

log = logging.getLogger(__name__)


_FFMPEG_OPTIONS = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
_RTSP_PORTS = {"rtsp": 554, "rtsps": 322}


class FfmpegOptionsGate:
    """OpenCV reads FFmpeg's options from one environment variable when a capture opens, so opens that need
    different options must not overlap. Opens that need the same options (every TCP camera, or every file)
    may: an offline camera's open lasts its whole timeout, and a single lock would queue every other
    stream's (re)connect behind each offline camera in turn. Admission is in arrival order between
    different options, so no kind of stream waits behind a steady flow of the other."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._tickets = itertools.count()
        self._waiting: dict[int, str | None] = {}
        self._options: str | None = None
        self._running = 0
        self._base: str | None = None

    def acquire(self, options: str | None, timeout_s: float) -> bool:
        """`options`: FFmpeg's option string for this open, or None for the process's own. False when the
        gate did not open within `timeout_s` (opens needing other options are still running)."""
        with self._condition:
            ticket = next(self._tickets)
            self._waiting[ticket] = options
            try:
                admitted = self._condition.wait_for(lambda: self._may_enter(ticket, options), timeout_s)
            finally:
                del self._waiting[ticket]
                self._condition.notify_all()
            if not admitted:
                return False
            if self._running == 0:
                self._options = options
                self._base = os.environ.get(_FFMPEG_OPTIONS)
                if options is not None:
                    os.environ[_FFMPEG_OPTIONS] = options
            self._running += 1
            return True

    def release(self) -> None:
        with self._condition:
            self._running -= 1
            if self._running == 0 and self._options is not None:
                if self._base is None:
                    os.environ.pop(_FFMPEG_OPTIONS, None)
                else:
                    os.environ[_FFMPEG_OPTIONS] = self._base
            self._condition.notify_all()

    def _may_enter(self, ticket: int, options: str | None) -> bool:
        if any(other < ticket and wanted != options for other, wanted in self._waiting.items()):
            return False
        return self._running == 0 or self._options == options


# Process-wide because the environment variable it guards is.
_FFMPEG_OPTIONS_GATE = FfmpegOptionsGate()


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
        # fpsprobesize 0: FFmpeg otherwise buffers seconds of frames to guess the frame rate, which delays
        # every (re)connect and starts the stream behind live.
        options = f"rtsp_transport;{config.transport}|fpsprobesize;0" if config.url.lower().startswith("rtsp") else None
        if options is not None and not _answers(config.url, config.open_timeout_ms / 1000):
            return False
        if not _FFMPEG_OPTIONS_GATE.acquire(options, config.open_timeout_ms / 1000):
            log.warning("stream %s: other streams' opens held FFmpeg's options for %d ms; trying again later",
                        config.id, config.open_timeout_ms, extra={"stream": config.id})
            return False
        try:
            capture = cv2.VideoCapture(target, cv2.CAP_FFMPEG, timeouts)
        finally:
            _FFMPEG_OPTIONS_GATE.release()
        return self._opened(capture)

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


def _answers(url: str, timeout_s: float) -> bool:
    """Whether the camera's RTSP port takes a TCP connection: an offline camera then fails here, in parallel
    with the others, rather than holding FFmpeg's options for its whole open timeout. True when the address
    cannot be read without doubt (a password with unencoded `/`, `?`, `#` or `@`): the open itself decides.
    False for a host name that cannot be looked up at all (`cam..site.local`): no open would ever reach it."""
    authority = url.split("://", 1)[-1].rpartition("@")
    if any(mark in authority[0] for mark in "/?#@"):
        return True
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port or _RTSP_PORTS.get(parts.scheme.lower())
    except ValueError:
        return True
    if not host or port is None:
        return True
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError:
        return False
    except ValueError as error:  # UnicodeError from the IDNA encoding of a malformed host name
        log.warning("%s: host name %r cannot be looked up (%s)", redact_url(url), host, error)
        return False
    return True
