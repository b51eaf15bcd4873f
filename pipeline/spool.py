"""The Kafka spool: encoded messages waiting for the broker, bounded by count and bytes.

When full, the oldest message goes first: a dashboard is better served by the newest results than by a
backlog it will never catch up on. With a spool directory, whatever is undelivered at stop is written
to disk and read back at the next start, so restarting vap during a broker outage loses nothing. The
file read back stays on disk until those messages are settled (or written again at stop), so a crash
of the next run loses none of them either: they may be sent twice, never lost.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SPOOL_FILE = "undelivered.spool"
_MAGIC = b"VAPSPOOL2\n"
_LENGTHS = struct.Struct(">?II")


@dataclass(frozen=True)
class OutgoingMessage:
    """An encoded message; `event` ones go to the events topic, the others to the results topic.

    `unexplained_failures` counts the delivery failures of no known kind, which the publisher bounds;
    `restored` marks a message read back from the previous run's file. Neither is saved to disk.
    """

    key: bytes
    value: bytes
    event: bool = False
    unexplained_failures: int = field(default=0, compare=False)
    restored: bool = field(default=False, compare=False)

    @property
    def size(self) -> int:
        return len(self.key) + len(self.value)


class Spool:
    """A FIFO with two bounds; every append reports how many old messages it pushed out."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._messages: deque[OutgoingMessage] = deque()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._messages)

    def __iter__(self) -> Iterator[OutgoingMessage]:
        return iter(self._messages)

    @property
    def bytes(self) -> int:
        return self._bytes

    def append(self, message: OutgoingMessage) -> int:
        self._messages.append(message)
        self._bytes += message.size
        return self._enforce_bounds()

    def put_back(self, messages: Iterable[OutgoingMessage]) -> int:
        """Return messages whose delivery failed to the front, in their original order."""
        returned = list(messages)
        self._messages.extendleft(reversed(returned))
        self._bytes += sum(message.size for message in returned)
        return self._enforce_bounds()

    def trim_to(self, max_messages: int) -> int:
        """Drop the oldest until at most `max_messages` are left; returns how many went."""
        dropped = 0
        while len(self._messages) > max(0, max_messages):
            self._bytes -= self._messages.popleft().size
            dropped += 1
        return dropped

    def popleft(self) -> OutgoingMessage | None:
        if not self._messages:
            return None
        message = self._messages.popleft()
        self._bytes -= message.size
        return message

    def drain(self) -> list[OutgoingMessage]:
        messages = list(self._messages)
        self._messages.clear()
        self._bytes = 0
        return messages

    def _enforce_bounds(self) -> int:
        dropped = 0
        while self._messages and (len(self._messages) > self._max_messages or self._bytes > self._max_bytes):
            self._bytes -= self._messages.popleft().size
            dropped += 1
        return dropped


def save_undelivered(directory: Path, messages: list[OutgoingMessage]) -> None:
    """Write atomically (temp file, then rename) so a crash mid-write never leaves a torn spool."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / SPOOL_FILE
    if not messages:
        target.unlink(missing_ok=True)
        return
    partial = target.with_suffix(".partial")
    with partial.open("wb") as handle:
        handle.write(_MAGIC)
        for message in messages:
            handle.write(_LENGTHS.pack(message.event, len(message.key), len(message.value)))
            handle.write(message.key)
            handle.write(message.value)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(target)


def discard_undelivered(directory: Path) -> None:
    """Remove the file once what it held is settled; it is written again if undelivered messages remain at stop."""
    (directory / SPOOL_FILE).unlink(missing_ok=True)


def load_undelivered(directory: Path) -> list[OutgoingMessage]:
    """Read what a previous run left; the file stays until `discard_undelivered` or the next save replaces it."""
    target = directory / SPOOL_FILE
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
