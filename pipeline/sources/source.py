"""What a stream reader needs from a decoder, whichever library decodes it."""

from __future__ import annotations

import logging
from typing import Protocol

from pipeline.frames import Image

log = logging.getLogger(__name__)


class InvalidFrame(Exception):
    """The decoder answered but gave no usable image (corrupt data, a stream still starting up)."""


class VideoSource(Protocol):
    """What a reader needs from a decoder; OpenCV in production, fakes in unit tests."""

    def open(self) -> bool: ...

    def read(self) -> Image | None:
        """The next decoded image, or None at the end of a file or when the stream failed.

        Raises InvalidFrame for a frame that decoded to nothing usable; the stream goes on.
        """

    def position_ms(self) -> float | None: ...

    def frame_rate(self) -> float | None: ...

    def close(self) -> None: ...
