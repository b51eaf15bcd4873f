"""The one way a stage runs a thread: named, beating, and reporting an unexpected end to health."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pipeline.ops.health import Heartbeats

log = logging.getLogger(__name__)


class StageThread:
    """A daemon thread running one stage loop.

    The loop returning is a normal end (its stage was stopped, or its work is done). The loop raising is a
    death: it is logged with its traceback and reported to `Heartbeats`, so `/healthz` fails, until the
    owner forgets the thread (a removed stream's reader). Either way the thread's heartbeat series goes.
    """

    def __init__(self, name: str, loop: Callable[[], None], heartbeats: Heartbeats) -> None:
        self._loop = loop
        self._heartbeats = heartbeats
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    @property
    def name(self) -> str:
        return self._thread.name

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Whether the thread has ended; a thread never started counts as ended."""
        if self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def beat(self, busy_for_s: float = 0.0) -> None:
        """Call once per turn of the loop (see `Heartbeats.beat`)."""
        self._heartbeats.beat(self.name, busy_for_s)

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException:
            log.exception("thread %s died", self.name)
            self._heartbeats.died(self.name)
        finally:
            self._heartbeats.forget(self.name)
