"""Decoding files on the GPU's video engines (NVDEC), so frames never pass through host memory.

Decoding 1080p takes a CPU core per 90 or so frames/s, and an uploaded frame crosses host memory twice.
NVDEC frees those cores for the rest of the pipeline, and a decoded frame stays on the device, where the
letterbox reads it without an upload. (On an H100 it decoded sixteen 1080p MPEG-4 files at about 1,070
frames/s, where sixteen CPU cores did 1,470: it pays by what it frees, not by its own speed.)

PyNvVideoCodec demuxes with its own FFmpeg build, which has no open or read timeouts, so only files are
decoded here; live streams keep OpenCV's reader, whose every blocking call has a timeout.
"""

from __future__ import annotations

import collections
import importlib
from typing import TYPE_CHECKING, Any

from pipeline.config import StreamConfig
from pipeline.sources.source import InvalidFrame

if TYPE_CHECKING:
    import torch


def nvdec_available() -> bool:
    """Whether PyNvVideoCodec imports; it needs the driver's libnvcuvid to create a decoder."""
    try:
        importlib.import_module("PyNvVideoCodec")
    except Exception:
        return False
    return True


def gpu_index(decoder: str) -> int:
    """`cuda` or `cuda:N` -> N (0 for `cuda`)."""
    return int(decoder.partition(":")[2] or 0)


class NvdecSource:
    """A file decoded by NVDEC into BGR uint8 frames (H, W, 3) on the device, as OpenCV would give them.

    The decoder converts to interleaved RGB itself; each frame is then copied once on the device with its
    channels reversed, which also frees the decoder's output surface for the next frame.
    """

    def __init__(self, config: StreamConfig, codec_module: Any = None) -> None:
        self._config = config
        self._gpu = gpu_index(config.decoder)
        self._codec = codec_module
        self._demuxer: Any = None
        self._decoder: Any = None
        self._packets: Any = None
        self._ready: collections.deque[Any] = collections.deque()
        self._frames = 0
        self._fps: float | None = None
        self._flushed = False
        self._stream: torch.cuda.Stream | None = None

    def open(self) -> bool:
        codec = self._codec or importlib.import_module("PyNvVideoCodec")
        self._codec = codec
        try:
            self._demuxer = codec.CreateDemuxer(filename=str(self._config.file_path))
            self._decoder = codec.CreateDecoder(
                gpuid=self._gpu, codec=self._demuxer.GetNvCodecId(), usedevicememory=True,
                outputColorType=codec.OutputColorType.RGB, cudastream=self._stream_handle(),
            )
        except Exception:
            self.close()
            return False
        fps = float(self._demuxer.FrameRate() or 0)
        self._fps = fps if 0 < fps < 1000 else None
        self._packets = iter(self._demuxer)
        return True

    def _stream_handle(self) -> int:
        """A stream of our own for the decoder's colour conversion and our copy: on the default stream both
        would queue behind the model's work and wait for it."""
        import torch

        if self._stream is None and torch.cuda.is_available():
            self._stream = torch.cuda.Stream(torch.device("cuda", self._gpu))  # type: ignore[no-untyped-call]
        return 0 if self._stream is None else int(self._stream.cuda_stream)

    def read(self) -> torch.Tensor | None:
        import torch
        from torch.utils.dlpack import from_dlpack

        while not self._ready:
            if self._decoder is None or self._flushed:
                return None
            packet = next(self._packets, None)
            if packet is None:
                self._flushed = True
                # An empty packet drains the frames the decoder still holds back for reordering.
                packet = self._codec.PacketData()
            try:
                self._ready.extend(self._decoder.Decode(packet))
            except Exception as error:  # a corrupt packet costs its frame, as with OpenCV, not the stream
                raise InvalidFrame(f"NVDEC could not decode a packet: {error}") from error
        if self._stream is None:
            return self._bgr(from_dlpack(self._ready.popleft()))
        with torch.cuda.stream(self._stream):
            bgr = self._bgr(from_dlpack(self._ready.popleft()))
        self._stream.synchronize()  # the decoder may overwrite its surface once asked for the next frame
        return bgr

    def _bgr(self, decoded: torch.Tensor) -> torch.Tensor:
        if decoded.ndim != 3 or decoded.shape[2] != 3 or decoded.numel() == 0:
            raise InvalidFrame(f"decoder returned {tuple(decoded.shape)}")
        self._frames += 1
        return decoded.flip(2)

    def position_ms(self) -> float | None:
        return None if self._fps is None else 1000.0 * (self._frames - 1) / self._fps

    def frame_rate(self) -> float | None:
        return self._fps

    def close(self) -> None:
        self._ready.clear()
        self._packets = None
        self._decoder = None
        self._demuxer = None
