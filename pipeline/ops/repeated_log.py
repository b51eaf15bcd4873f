"""Logging a failure that can repeat on every frame without flooding the log."""

from __future__ import annotations

import logging
import threading
import time

_EVERY_S = 10.0


class RepeatedErrorLog:
    """One log line per interval for a failure that can repeat on every frame; the ones between are counted."""

    def __init__(self, logger: logging.Logger, every_s: float = _EVERY_S) -> None:
        self._logger = logger
        self._every_s = every_s
        self._lock = threading.Lock()
        self._next_at = 0.0
        self._suppressed = 0

    def error(self, message: str, *args: object, exc_info: bool | BaseException = False) -> None:
        with self._lock:
            now = time.monotonic()
            if now < self._next_at:
                self._suppressed += 1
                return
            self._next_at = now + self._every_s
            suppressed, self._suppressed = self._suppressed, 0
        if suppressed:
            message += " (and %d more like it since the last report)"
            args = (*args, suppressed)
        self._logger.error(message, *args, exc_info=exc_info)
