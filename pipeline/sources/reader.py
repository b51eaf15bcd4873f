"""Stream readers: one thread per camera or file, decoding with OpenCV and feeding the frame hub.

Each reader owns an explicit state machine (connecting -> up -> backoff -> connecting ... -> stopped)
and reconnects with exponential backoff and jitter. A stream is up once a frame arrived, not once it opened:
a camera that takes the session but sends no media is down. On failure it emits nothing: never a black or a
repeated frame. Every OpenCV call that can block has a timeout, so stop always gets through.
"""

from __future__ import annotations

import enum
import logging
import random
import threading
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone

from pipeline.batching.hub import FrameHub, OverflowPolicy
from pipeline.config import StreamConfig
from pipeline.frames import Frame
from pipeline.ledger import FrameLedger, FrameTicket
from pipeline.ops.health import Heartbeats
from pipeline.ops.metrics import PipelineMetrics
from pipeline.sources.opencv import OpenCvSource
from pipeline.sources.source import InvalidFrame, VideoSource
from pipeline.threads import StageThread

log = logging.getLogger(__name__)

_FILE_ATTEMPTS = 3
_PACED_STEP_MAX_S = 5.0
_PACED_STEP_MAX_PERIODS = 4


class StreamState(enum.Enum):
    CONNECTING = "connecting"
    UP = "up"
    BACKOFF = "backoff"
    STOPPED = "stopped"


ALLOWED_TRANSITIONS: dict[StreamState, frozenset[StreamState]] = {
    StreamState.CONNECTING: frozenset({StreamState.UP, StreamState.BACKOFF, StreamState.STOPPED}),
    StreamState.UP: frozenset({StreamState.CONNECTING, StreamState.BACKOFF, StreamState.STOPPED}),
    StreamState.BACKOFF: frozenset({StreamState.CONNECTING, StreamState.STOPPED}),
    StreamState.STOPPED: frozenset(),
}


class _Pacer:
    """Paces a file read in real time by its media time. Timestamps may jump (a cut, a recording resumed
    hours later, a rewind); a step larger than `_PACED_STEP_MAX_S`, and than a few frame periods, restarts
    the pacing there instead of sleeping through it."""

    def __init__(self, file_fps: float) -> None:
        self._step_max_s = max(_PACED_STEP_MAX_S, _PACED_STEP_MAX_PERIODS / file_fps)
        self._anchor_media_s: float | None = None
        self._anchor_monotonic = 0.0
        self._last_media_s = 0.0

    def due(self, media_s: float, now: float) -> tuple[float, float | None]:
        """When the frame at `media_s` is due, and the jump (seconds) when the pacing restarted at it."""
        jump = None
        if self._anchor_media_s is None or abs(media_s - self._last_media_s) > self._step_max_s:
            if self._anchor_media_s is not None:
                jump = media_s - self._last_media_s
            self._anchor_media_s, self._anchor_monotonic = media_s, now
        self._last_media_s = media_s
        return self._anchor_monotonic + (media_s - self._anchor_media_s), jump


class _RateCap:
    """Keeps frames on a schedule of `fps`, not "a period since the last kept frame": that would keep every
    third frame of a 25 fps camera capped at 10 (8.3 fps). Frames within a tenth of a period are on time."""

    def __init__(self, fps: float) -> None:
        self._period_s = 1.0 / fps
        self._next_due: float | None = None

    def keep(self, clock: float) -> bool:
        period = self._period_s
        if self._next_due is not None and clock < self._next_due - 0.1 * period:
            return False
        behind = self._next_due is None or clock - self._next_due > period
        self._next_due = (clock if behind or self._next_due is None else self._next_due) + period
        return True


class StreamReader:
    """Reads one stream on its own thread until stopped or, for a non-looping file, until its end. In fleet
    mode, a frame read once the replica's group lease has run out goes no further (`lease_lost`).

    Every frame read is reported to the ledger under this reader's run, and so is every frame lost here
    (decode errors, the rate cap, a full buffer, a stop). Once the stream is removed (and perhaps added again
    under the same id), whatever this reader still does reaches neither the new run's counts nor its frames.
    """

    def __init__(
        self,
        config: StreamConfig,
        run: int,
        hub: FrameHub,
        ledger: FrameLedger,
        metrics: PipelineMetrics,
        heartbeats: Heartbeats,
        source_factory: Callable[[StreamConfig], VideoSource] = OpenCvSource,
        lease: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        self._lease = lease
        self.run = run
        self._hub = hub
        self._ledger = ledger
        self._decode_seconds = metrics.stage_seconds.labels(stage="decode")
        self._source_factory = source_factory
        self._log = logging.LoggerAdapter(log, {"stream": config.id})
        self._stop = threading.Event()
        self._state = StreamState.CONNECTING
        self._state_lock = threading.Lock()
        self._thread = StageThread(f"reader-{config.id}", self._run, heartbeats)
        self._series = ledger.series(config.id, run)
        self._slot = hub.slot(config.id)
        self.finished = threading.Event()
        self.last_frame_monotonic: float | None = None
        self._frame_id = 0
        self._failures = 0
        self._ever_read = False
        self._up_since = 0.0
        self._last_error: str | None = None

    @property
    def state(self) -> StreamState:
        return self._state

    @property
    def thread_name(self) -> str:
        return self._thread.name

    @property
    def ever_read(self) -> bool:
        """Whether the stream ever gave a decodable frame (frames lost to decode errors count as read, not this)."""
        return self._ever_read

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        return self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _set_state(self, new_state: StreamState) -> None:
        with self._state_lock:
            if new_state is self._state:
                return
            if new_state not in ALLOWED_TRANSITIONS[self._state]:
                raise RuntimeError(f"stream {self.config.id}: {self._state.value} -> {new_state.value}")
            self._log.info("stream %s: %s -> %s", self.config.id, self._state.value, new_state.value)
            self._state = new_state
            if new_state is StreamState.UP:
                self._up_since = time.monotonic()
                self._last_error = None
        if self._series is not None:
            self._series.up.set(1 if new_state is StreamState.UP else 0)

    def _run(self) -> None:
        looping = False
        try:
            while not self._stop.is_set():
                if not looping:
                    self._set_state(StreamState.CONNECTING)
                looping = False
                reached_end = self._attempt()
                if reached_end and self.config.kind == "file":
                    if not self.config.loop:
                        break
                    looping = True
                    continue
                if self._stop.is_set() or self._file_unreadable():
                    break
                self._back_off()
        finally:
            self._set_state(StreamState.STOPPED)
            self.finished.set()

    def _attempt(self) -> bool:
        """One open and read of the stream; whether it reached the end of a file. An unexpected exception (a
        host name that cannot be encoded, an OpenCV error in a read) fails this attempt like a lost stream,
        not the reader: otherwise the stream would never be tried again."""
        self._thread.beat(busy_for_s=self.config.open_timeout_ms / 1000 + 1)
        source: VideoSource | None = None
        try:
            source = self._source_factory(self.config)
            if not source.open():
                self._log.warning("stream %s: cannot open %s", self.config.id, self.config.redacted_url)
                return False
            reached_end = self._read_until_failure(source)
            if not reached_end and not self._stop.is_set():
                self._log.warning("stream %s: lost, reconnecting", self.config.id)
            return reached_end
        except Exception as error:
            self._unexpected(error)
            return False
        finally:
            if source is not None:
                try:
                    source.close()
                except Exception as error:
                    self._unexpected(error)

    def _unexpected(self, error: Exception) -> None:
        """The traceback once per distinct failure, then one line per attempt: a stream that fails the same way
        at every reconnect would otherwise repeat it every backoff. Camera URLs are redacted."""
        url, redacted = self.config.url, self.config.redacted_url
        summary = f"{type(error).__qualname__}: {error}".replace(url, redacted)
        if summary == self._last_error:
            self._log.warning("stream %s: failed again (%s); reconnecting", self.config.id, summary)
            return
        self._last_error = summary
        details = "".join(traceback.format_exception(error)).replace(url, redacted).rstrip()
        self._log.error("stream %s: unexpected failure; reconnecting\n%s", self.config.id, details)

    def _file_unreadable(self) -> bool:
        """A camera may come back; a file that has never given a frame, after a few tries, will not, and
        retrying it for ever would keep `vap run` on files from ever finishing. One that has (a looping
        clip on a share that hiccups, say) is retried like a camera."""
        if self.config.kind != "file" or self._ever_read or self._failures + 1 < _FILE_ATTEMPTS:
            return False
        self._log.error("stream %s: cannot read %s after %d tries; giving up on it", self.config.id,
                        self.config.redacted_url, _FILE_ATTEMPTS)
        return True

    def _back_off(self) -> None:
        self._set_state(StreamState.BACKOFF)
        base = self.config.reconnect_backoff_s * (2 ** min(self._failures, 16))
        delay = min(self.config.reconnect_backoff_max_s, base) * random.uniform(0.5, 1.0)
        self._failures += 1
        if not self._wait_until(time.monotonic() + delay) and self._series is not None:
            self._series.reconnects.inc()

    def _wait_until(self, deadline: float) -> bool:
        """Whether stop came first. Beats at least once a second, so a long wait does not read as stuck."""
        while (left := deadline - time.monotonic()) > 0:
            if self._stop.wait(min(1.0, left)):
                return True
            self._thread.beat()
        return self._stop.is_set()

    def _next_ticket(self) -> FrameTicket:
        """Every frame read gets the next id, even one lost here, so consumers see the gap."""
        ticket = FrameTicket(self.config.id, self.run, self._frame_id)
        self._frame_id += 1
        return ticket

    def _read_until_failure(self, source: VideoSource) -> bool:
        """Read frames until stop (False), the end of a file (True) or a failure (False).

        The backoff starts again from its first step only once the stream has been up for a stall timeout:
        a camera that drops sooner than we would declare it lost ourselves is flapping, and reconnecting it at
        the first step after each frame would hammer it several times a second.
        """
        is_file = self.config.kind == "file"
        file_fps = source.frame_rate() or 25.0
        pacer = _Pacer(file_fps) if is_file and self.config.realtime else None
        cap = None if self.config.fps is None else _RateCap(self.config.fps)
        frames_this_session = 0
        read_busy_s = self.config.stall_timeout_s + 1
        last_valid = time.monotonic()
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                image = source.read()
            except InvalidFrame:
                self._ledger.read_and_dropped(self._next_ticket(), "decode_error")
                if time.monotonic() - last_valid > self.config.stall_timeout_s:
                    return False
                continue
            finally:
                self._thread.beat(busy_for_s=read_busy_s)
            if image is None:
                return is_file and frames_this_session > 0
            now = last_valid = time.monotonic()
            self._decode_seconds.observe(now - started)
            if frames_this_session == 0:
                self._set_state(StreamState.UP)
            if self._failures and now - self._up_since >= self.config.stall_timeout_s:
                self._failures = 0
            pts_ms = source.position_ms()
            media_s = (pts_ms if pts_ms is not None else frames_this_session * 1000 / file_fps) / 1000
            frames_this_session += 1
            self._ever_read = True
            self.last_frame_monotonic = now
            ticket = self._next_ticket()
            self._ledger.read(ticket)
            if pacer is not None and self._wait_paced(pacer, media_s, now, ticket):
                return False
            if cap is not None and not cap.keep(media_s if is_file else now):
                self._ledger.dropped(ticket, "fps_cap")
                continue
            frame = Frame(stream_id=ticket.stream_id, frame_id=ticket.frame_id, pts_ms=pts_ms,
                          captured_at=datetime.now(timezone.utc), captured_monotonic=time.monotonic(), image=image,
                          run=self.run)
            if self._lease is not None and not self._lease():  # after the timestamp: a freeze between the two
                self._ledger.dropped(ticket, "lease_lost")   # must not pass a frame stamped after it
                continue
            lost = self._hub.put(frame, self._stop, self._slot)
            if lost is not None:
                self._ledger.dropped(lost[0].ticket, lost[1])
        return False

    def _wait_paced(self, pacer: _Pacer, media_s: float, now: float, ticket: FrameTicket) -> bool:
        """Waits until the frame is due; True (the frame dropped, shutdown) when a stop came first."""
        due, jump = pacer.due(media_s, now)
        if jump is not None:
            self._log.info("stream %s: timestamps jump %.1f s at frame %d; pacing restarts there", self.config.id,
                           jump, ticket.frame_id)
        if self._wait_until(due):
            self._ledger.dropped(ticket, "shutdown")
            return True
        return False


def max_age_for(config: StreamConfig) -> float | None:
    """The staleness budget in seconds; files that wait for the batcher are never stale."""
    if overflow_policy_for(config) is OverflowPolicy.WAIT or config.max_staleness_ms is None:
        return None
    return config.max_staleness_ms / 1000


def overflow_policy_for(config: StreamConfig) -> OverflowPolicy:
    """Files read as fast as possible wait (nothing lost); live streams and paced files keep the freshest frames."""
    return OverflowPolicy.WAIT if config.kind == "file" and not config.realtime else OverflowPolicy.DROP_OLDEST
