"""RTSP cameras decoded with PyAV, FFmpeg's options passed with each open.

Why not OpenCV for these: OpenCV reads FFmpeg's options (the RTSP transport, the probe size) from one
process-wide environment variable, `OPENCV_FFMPEG_CAPTURE_OPTIONS`, when a capture opens. Streams that need
different options would have to take turns changing it, and changing the environment while native threads
(FFmpeg's, OpenVINO's) may read it is unsafe. PyAV takes the options as an argument of each open, and
timeouts for the open and for each read, so every camera connects with its own settings, in parallel.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.config import StreamConfig
from pipeline.sources.source import InvalidFrame

log = logging.getLogger(__name__)


def rtsp_options(config: StreamConfig) -> dict[str, str]:
    """fpsprobesize 0: FFmpeg otherwise buffers seconds of frames to guess the frame rate, which delays every
    (re)connect and starts the stream behind live."""
    return {"rtsp_transport": config.transport, "fpsprobesize": "0"}


class PyAvSource:
    """One RTSP stream's demuxer and decoder; a `VideoSource`."""

    def __init__(self, config: StreamConfig, threads: int = 0) -> None:
        self._config = config
        self._threads = threads
        self._container: Any = None
        self._stream: Any = None
        self._packets: Iterator[Any] | None = None
        self._decoded: deque[Any] = deque()
        self._position_ms: float | None = None

    def open(self) -> bool:
        import av

        config = self._config
        try:
            container = av.open(config.url, options=rtsp_options(config),
                                timeout=(config.open_timeout_ms / 1000, config.stall_timeout_s))
        except (av.FFmpegError, OSError, UnicodeError) as error:
            log.debug("stream %s: open failed: %s", config.id, error)
            return False
        if not container.streams.video:
            container.close()
            return False
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if self._threads > 0:
            stream.codec_context.thread_count = self._threads
        self._container, self._stream = container, stream
        self._packets = container.demux(stream)
        return True

    def read(self) -> npt.NDArray[np.uint8] | None:
        """The next frame; None when the stream ended or failed (a read timeout included). A packet that
        decodes to nothing usable raises InvalidFrame, and the stream goes on."""
        import av

        while not self._decoded:
            if self._packets is None:
                return None
            try:
                packet = next(self._packets)
            except (StopIteration, av.FFmpegError, OSError):
                return None
            if packet.size == 0:  # the demuxer's flush packet: the stream has ended
                return None
            try:
                self._decoded.extend(packet.decode())
            except av.error.InvalidDataError as error:
                raise InvalidFrame(f"PyAV could not decode a packet: {error}") from error
            except av.FFmpegError:
                return None
        frame = self._decoded.popleft()
        self._position_ms = None if frame.time is None else float(frame.time) * 1000
        image: npt.NDArray[np.uint8] = frame.to_ndarray(format="bgr24")
        if image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
            raise InvalidFrame(f"decoder returned {image.shape}")
        return image

    def position_ms(self) -> float | None:
        return self._position_ms

    def frame_rate(self) -> float | None:
        rate = None if self._stream is None else (self._stream.average_rate or self._stream.guessed_rate)
        fps = None if rate is None else float(rate)
        return fps if fps is not None and 0 < fps < 1000 else None

    def close(self) -> None:
        container, self._container, self._packets = self._container, None, None
        self._decoded.clear()
        if container is not None:
            container.close()
