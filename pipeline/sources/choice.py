"""Which decoder reads a stream: one rule for the readers' threads and for the decoder processes."""

from __future__ import annotations

import functools
from collections.abc import Callable

from pipeline.config import StreamConfig
from pipeline.sources.nvdec import NvdecSource
from pipeline.sources.opencv import OpenCvSource
from pipeline.sources.pyav import PyAvSource
from pipeline.sources.source import VideoSource


def local_source_factory(stream: StreamConfig, threads: int) -> Callable[[StreamConfig], VideoSource]:
    """NVDEC when asked for; PyAV for RTSP cameras, which need FFmpeg options of their own; OpenCV else.
    `threads`: FFmpeg's decoder threads for the stream."""
    if stream.decoder != "cpu":
        return NvdecSource
    if stream.url.lower().startswith(("rtsp://", "rtsps://")):
        return functools.partial(PyAvSource, threads=threads)
    return functools.partial(OpenCvSource, threads=threads)
