"""The Kafka spool: encoded messages waiting for the broker, bounded by count and bytes.

When full, the oldest message goes first: a dashboard is better served by the newest results than by a
backlog it will never catch up on. With a spool directory, every message is also in a write-ahead log on
disk (`spool_log.py`) until it is settled, so neither a restart nor a crash of vap during a broker outage
loses what waited.

Order: every message carries the sequence number it was built with. Failed deliveries come back in
whatever order Kafka reports them (kafka-python aborts a closed producer's batches from a set), so the
spool puts them back by sequence, and the log gives them back in sequence order at the next start (where
numbering goes on after them): each stream stays in order across retries, producer rebuilds and restarts
of vap.
"""

from __future__ import annotations

import heapq
import logging
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

from pipeline.ledger import FrameTicket

log = logging.getLogger(__name__)

LEGACY_SPOOL_FILE = "undelivered.spool"  # what versions before the log saved at a clean stop
_MAGIC = b"VAPSPOOL2\n"
_LENGTHS = struct.Struct(">?II")


@dataclass(frozen=True)
class OutgoingMessage:
    """An encoded message; `event` ones go to the events topic, the others to the results topic.

    `ticket` names the frame a result message is for, so its fate reaches the ledger (None for events and
    for messages read back from a previous run). `sequence` orders messages as they reached the publisher
    (see the module's docstring), across restarts too; `unexplained_failures` counts the delivery failures
    of no known kind, which the publisher bounds; `built_monotonic` is when it was encoded; `logged` marks a
    message the spool's log holds until it is settled. Key, value, lane and sequence are what the log keeps.
    """

    key: bytes
    value: bytes
    event: bool = False
    ticket: FrameTicket | None = field(default=None, compare=False)
    sequence: int = field(default=0, compare=False)
    unexplained_failures: int = field(default=0, compare=False)
    built_monotonic: float = field(default=0.0, compare=False)
    logged: bool = field(default=False, compare=False)

    @property
    def size(self) -> int:
        return len(self.key) + len(self.value)


def _sequence(message: OutgoingMessage) -> int:
    return message.sequence


class Spool:
    """Two FIFOs in sequence order, results and events, under one pair of bounds.

    Events have a lane of their own so that the publisher can hold them back (their topic is not there yet,
    say) while results go on; the bounds still push out the oldest message of either lane first. Every
    method that adds returns the messages it pushed out, oldest first, for the caller to count.
    """

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._lanes: dict[bool, deque[OutgoingMessage]] = {False: deque(), True: deque()}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._lanes[False]) + len(self._lanes[True])

    def __iter__(self) -> Iterator[OutgoingMessage]:
        return chain(self._lanes[False], self._lanes[True])

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def has_events(self) -> bool:
        return bool(self._lanes[True])

    def append(self, message: OutgoingMessage) -> list[OutgoingMessage]:
        """Add the newest message; one larger than the byte bound on its own is the only one dropped."""
        if message.size > self._max_bytes:
            return [message]
        self._lanes[message.event].append(message)
        self._bytes += message.size
        return self.trim_to(self._max_messages, self._max_bytes)

    def put_back(self, messages: Iterable[OutgoingMessage]) -> list[OutgoingMessage]:
        """Return messages whose delivery failed, each to its place in sequence order."""
        returned = sorted(messages, key=_sequence)
        dropped = [message for message in returned if message.size > self._max_bytes]
        for event, lane in self._lanes.items():
            mine = [message for message in returned if message.event == event and message.size <= self._max_bytes]
            if not mine:
                continue
            self._bytes += sum(message.size for message in mine)
            # Only the lane's older head is merged: rebuilding a spool of millions for each returned group would
            # hold the publisher's lock for a good part of a second.
            older: list[OutgoingMessage] = []
            while lane and lane[0].sequence < mine[-1].sequence:
                older.append(lane.popleft())
            lane.extendleft(reversed(list(heapq.merge(mine, older, key=_sequence))))
        return dropped + self.trim_to(self._max_messages, self._max_bytes)

    def trim_to(self, max_messages: int, max_bytes: int) -> list[OutgoingMessage]:
        """Drop the oldest until at most `max_messages` and `max_bytes` are left; returns those that went."""
        dropped = []
        while len(self) > max(0, max_messages) or self._bytes > max(0, max_bytes):
            lane = self._oldest_lane(events=True)
            if lane is None:
                break
            message = lane.popleft()
            self._bytes -= message.size
            dropped.append(message)
        return dropped

    def popleft(self, events: bool = True) -> OutgoingMessage | None:
        """The oldest message; with `events` false, the oldest result (events wait)."""
        lane = self._oldest_lane(events)
        if lane is None:
            return None
        message = lane.popleft()
        self._bytes -= message.size
        return message

    def drop_through(self, sequence: int) -> list[OutgoingMessage]:
        """Every message up to `sequence`, oldest first, out of the spool."""
        dropped = []
        while (lane := self._oldest_lane(events=True)) is not None and lane[0].sequence <= sequence:
            message = lane.popleft()
            self._bytes -= message.size
            dropped.append(message)
        return dropped

    def first_sequence(self) -> int | None:
        heads = [lane[0].sequence for lane in self._lanes.values() if lane]
        return min(heads, default=None)

    def take_events(self) -> list[OutgoingMessage]:
        """Every event, oldest first, out of the spool (their topic cannot take them)."""
        events = list(self._lanes[True])
        self._lanes[True].clear()
        self._bytes -= sum(message.size for message in events)
        return events

    def drain(self) -> list[OutgoingMessage]:
        messages = list(heapq.merge(self._lanes[False], self._lanes[True], key=_sequence))
        for lane in self._lanes.values():
            lane.clear()
        self._bytes = 0
        return messages

    def _oldest_lane(self, events: bool) -> deque[OutgoingMessage] | None:
        results, held = self._lanes[False], self._lanes[True]
        if not events or not held:
            return results or None
        if not results or held[0].sequence < results[0].sequence:
            return held
        return results


def load_legacy_spool_file(directory: Path) -> list[OutgoingMessage]:
    """What an older vap saved at a clean stop (`undelivered.spool`), for the log to take over; the caller
    removes the file once the log holds its messages."""
    target = directory / LEGACY_SPOOL_FILE
    if not target.is_file():
        return []
    data = target.read_bytes()
    messages: list[OutgoingMessage] = []
    if not data.startswith(_MAGIC):
        log.error("ignoring %s: not a vap spool file", target)
        return []
    offset = len(_MAGIC)
    while offset + _LENGTHS.size <= len(data):
        event, key_length, value_length = _LENGTHS.unpack_from(data, offset)
        offset += _LENGTHS.size
        end = offset + key_length + value_length
        if end > len(data):
            log.error("%s is truncated; kept the %d complete messages before the damage", target, len(messages))
            break
        messages.append(OutgoingMessage(data[offset : offset + key_length], data[offset + key_length : end], event))
        offset = end
    return messages
