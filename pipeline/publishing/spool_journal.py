"""Keeps the spool's log on disk (`spool_log.py`) in step with the delivery state machine (`delivery.py`).

The publisher's loop calls `write` every turn: messages that entered the spool are written before they can
be sent, then the settlements. The log is kept within `kafka.spool.max_bytes` by dropping the oldest waiting
messages (counted); what a broker that went away still holds in flight counts against it. It is synced at
most half a second after a write. `recover` runs once at start, `close` once at the end; all three on the
loop's side of the thread, never concurrently.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from pipeline.ops.metrics import PipelineMetrics
from pipeline.publishing.accounting import DeliveryAccounting
from pipeline.publishing.delivery import DeliveryState
from pipeline.publishing.spool import LEGACY_SPOOL_FILE, OutgoingMessage, load_legacy_spool_file
from pipeline.publishing.spool_log import SpoolLog, WriteFn, message_record_bytes

log = logging.getLogger("pipeline.publishing.publisher")


def segment_bytes(max_bytes: int) -> int:
    """Segments small enough that settled ones are deleted long before the log reaches its bound."""
    return max(4096, min(8 * 2**20, max_bytes // 8))


def settlements_reserve(max_bytes: int) -> int:
    """Room kept for settlement records, which are written before the room their turn makes: messages are kept
    within the rest, so the log stays within `max_bytes` while a turn settles fewer than an eighth of this many
    messages (127 with a 16 KB bound, 131,000 with 64 MiB)."""
    return min(max_bytes // 8, max(1024, max_bytes // 64))


class SpoolJournal:
    """The spool's log of one publisher. `lock` is the publisher's, which guards `state`."""

    def __init__(self, directory: Path, max_bytes: int, state: DeliveryState, lock: threading.Condition,
                 accounting: DeliveryAccounting, metrics: PipelineMetrics, write: WriteFn) -> None:
        self._directory = directory
        self._max_bytes = max_bytes
        self._messages_max_bytes = max_bytes - settlements_reserve(max_bytes)
        self._state = state
        self._lock = lock
        self._accounting = accounting
        self._metrics = metrics
        self._log = SpoolLog(directory, segment_bytes(max_bytes), write=write)

    def recover(self) -> None:
        """Take back what the previous runs left unsettled, before anything new is numbered; an older vap's
        `undelivered.spool` is taken over by the log."""
        recovered = self._log.recover()
        self._metrics.spool_log_damaged.inc(recovered.damaged)
        self._metrics.spool_log_messages["recovered"].inc(len(recovered.messages))
        if recovered.messages:
            log.info("resending %d message(s) left unsettled by the previous run", len(recovered.messages))
        legacy = load_legacy_spool_file(self._directory)
        now = time.monotonic()
        with self._lock:
            outcomes = self._state.restore(recovered.messages, now, recovered.next_sequence)
            outcomes += self._state.accept(legacy, now)
        self._accounting.record(outcomes)
        self.write(now)
        self._log.sync()
        if legacy:
            log.info("resending %d message(s) an older vap kept in %s", len(legacy),
                     self._directory / LEGACY_SPOOL_FILE)
            (self._directory / LEGACY_SPOOL_FILE).unlink(missing_ok=True)

    def write(self, now: float) -> None:
        """The turn's settlements first, which frees segments; then room is made for the turn's new messages, and
        they are written. So the log does not go beyond its bound by a turn's worth even for a moment: a turn
        under load can bring more than the bound, and the spool drops the oldest of them at once. Those are
        never written (nothing is left to resend), nor is their settlement. When nothing older can go (messages
        in flight hold the rest), the oldest of the turn's own messages are dropped unwritten."""
        with self._lock:
            appended, settled = self._state.take_journal()
        gone = set(settled)
        appended = [message for message in appended if message.sequence not in gone]
        self._log.settle(settled, now)
        incoming = sum(message_record_bytes(message) for message in appended)
        self._keep_within_bound(now, incoming)
        if self._log.disk_bytes + incoming > self._messages_max_bytes:
            appended = self._fitting(appended, now)
        self._append(appended, now)
        self._log.sync_if_due(now)
        self._metrics.spool_log_bytes.set(self._log.disk_bytes)

    def close(self, undelivered: list[OutgoingMessage]) -> list[OutgoingMessage]:
        """Close the log; returns the undelivered messages it does not hold (the disk failed them), which the
        caller counts as dropped. Those it holds wait there for the next start."""
        lost = [message for message in undelivered if not (message.logged and self._log.holds(message.sequence))]
        self._log.close()
        if len(undelivered) > len(lost):
            log.warning("kept %d undelivered message(s) in %s for the next start", len(undelivered) - len(lost),
                        self._directory)
        return lost

    def _apply(self, now: float) -> None:
        with self._lock:
            appended, settled = self._state.take_journal()
        self._append(appended, now)
        self._log.settle(settled, now)

    def _append(self, appended: list[OutgoingMessage], now: float) -> None:
        unwritten = self._log.append(appended, now)
        counts = self._metrics.spool_log_messages
        if unwritten:
            counts["unwritten"].inc(len(unwritten))
        if len(appended) > len(unwritten):
            counts["written"].inc(len(appended) - len(unwritten))

    def _fitting(self, appended: list[OutgoingMessage], now: float) -> list[OutgoingMessage]:
        """The newest of the turn's messages that fit in the room left, once nothing older can go; the others are
        dropped (and counted) unwritten, with every waiting message older than they."""
        room = self._messages_max_bytes - self._log.disk_bytes
        cut = len(appended)
        while cut > 0 and (size := message_record_bytes(appended[cut - 1])) <= room:
            room -= size
            cut -= 1
        if cut == 0:
            return appended
        self._drop_waiting_through(appended[cut - 1].sequence, now)
        return appended[cut:]

    def _drop_waiting_through(self, sequence: int, now: float) -> bool:
        """Drops (and counts) the waiting messages numbered up to `sequence`; whether one of those numbers is still
        held here (in flight)."""
        with self._lock:
            outcomes = self._state.drop_spooled_through(
                sequence, now, f"the spool's log reached kafka.spool.max_bytes ({self._max_bytes})")
            held = self._state.holds_through(sequence)
        self._accounting.record(outcomes)
        return held

    def _keep_within_bound(self, now: float, incoming: int) -> None:
        """Beyond `max_bytes` on disk, with `incoming` bytes still to come, the waiting messages of the oldest
        segment are dropped (and counted), so that it goes. A segment pinned by messages in flight stays until
        they come back, so the next one's waiting messages go, and so on, and the settled segments behind the
        pinned ones are deleted."""
        spool_log = self._log
        index = 0
        while spool_log.disk_bytes + incoming > self._messages_max_bytes:
            last = spool_log.last_sequence_of(index)
            if last is None:
                return
            held = self._drop_waiting_through(last, now)
            segments = spool_log.segments
            self._apply(now)
            if not held:
                spool_log.forget_through(last)
            else:
                spool_log.delete_settled_segments(now)
            index = 0 if spool_log.segments < segments else index + 1
