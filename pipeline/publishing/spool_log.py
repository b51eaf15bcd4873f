"""The spool's write-ahead log (`kafka.spool.dir`): what waits for the broker survives a crash of vap.

A SIGKILL, an OOM kill or a power cut gives no chance to save anything, so every message is written here
before it can be handed to Kafka, and its settlement (acknowledged, or dropped and counted) is written after.
The next start reads back the messages that were never settled and sends them again: delivery is at least
once, and a consumer drops the few duplicates by stream id, `frame_id` and `captured_at`.

On disk: numbered segment files, `spool-<number>.log`. A segment holds records, each framed by its length
and a CRC-32, so a tear (a power cut mid-write, a full disk) is found where it starts; what comes before it
is kept, the rest of that segment is skipped and counted. Two kinds of record: a message (its sequence
number, lane, key and value) and a list of settled sequence numbers. New records go to the newest segment,
which rolls over at a size; the oldest segments are deleted, in order, once all their messages are settled.
A settled segment behind an older one still pinned (its messages in flight to a broker that went away, which
fails them only after its request timeout) goes too when the log needs the room: the settlements of the
older segments are written again first, so a settlement record is never gone while the message it settles
is still on disk.

Writes are not synced one by one: `sync` (fsync) runs at most `SYNC_INTERVAL_S` after a write, so a crash
loses at most the last half second of messages, for one fsync twice a second rather than one per message.

Sequence numbers go on across restarts (the next start continues after the largest one found), so a
message keeps its number, and its place in its stream's order, however many times vap restarts.

One vap process at a time: `recover` takes an exclusive lock on `lock` in the directory (released by the
kernel however the process ends), since two writers would each delete what the other still needs.

Nothing here raises on a bad disk: a write that fails is logged, rolled back, and reported to the caller,
which counts the messages it could not keep (they still go to Kafka from memory).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import logging
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.ops.repeated_log import RepeatedErrorLog
from pipeline.publishing.spool import OutgoingMessage

log = logging.getLogger(__name__)

SYNC_INTERVAL_S = 0.5
_FILE_MAGIC = b"VAPLOG1\n"
_SEGMENT_NAME = re.compile(r"^spool-(\d{12})\.log$")
_FRAME = struct.Struct(">IBI")  # crc32 of what follows it, record kind, body length
_MESSAGE = struct.Struct(">QBI")  # sequence, event lane, key length; the value is the rest of the body
_SEQUENCE = struct.Struct(">Q")
_KIND_MESSAGE = 1
_KIND_SETTLED = 2
_MAX_BODY = 1 << 30

WriteFn = Callable[[int, bytes], int]


class SpoolDirInUse(RuntimeError):
    """Another running vap holds the spool directory's lock."""


@dataclass(frozen=True)
class Recovered:
    """What the log held at start: the unsettled messages in sequence order, the sequence to go on from, how
    many damaged stretches were skipped, and the log's size on disk."""

    messages: list[OutgoingMessage]
    next_sequence: int
    damaged: int
    disk_bytes: int
    last_segment_number: int = 0


@dataclass
class _Segment:
    number: int
    path: Path
    size: int
    first_sequence: int
    live: set[int] = field(default_factory=set)
    last_written: int = -1

    def settled(self) -> list[int]:
        """The numbers of its messages that are settled (and of any the spool numbered but dropped unwritten)."""
        return [sequence for sequence in range(self.first_sequence, self.last_written + 1) if sequence not in self.live]


@dataclass
class _Parsed:
    messages: dict[int, OutgoingMessage]
    settled: set[int]
    good_bytes: int
    damaged: bool


def segment_files(directory: Path) -> list[tuple[int, Path]]:
    """The log's segments in order, oldest first."""
    found = []
    for path in directory.iterdir() if directory.is_dir() else ():
        match = _SEGMENT_NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def parse_segment(data: bytes) -> _Parsed:
    """Every complete, intact record up to the first damage; what follows a tear cannot be trusted."""
    parsed = _Parsed({}, set(), 0, False)
    if not data.startswith(_FILE_MAGIC):
        parsed.damaged = bool(data)
        return parsed
    offset = len(_FILE_MAGIC)
    while offset < len(data):
        if offset + _FRAME.size > len(data):
            parsed.damaged = True
            break
        crc, kind, length = _FRAME.unpack_from(data, offset)
        body_start = offset + _FRAME.size
        body = data[body_start : body_start + length]
        if length > _MAX_BODY or len(body) < length or zlib.crc32(body, zlib.crc32(bytes((kind,)))) != crc:
            parsed.damaged = True
            break
        if kind == _KIND_MESSAGE and length >= _MESSAGE.size:
            sequence, event, key_length = _MESSAGE.unpack_from(body)
            key_end = _MESSAGE.size + key_length
            if key_end > length:
                parsed.damaged = True
                break
            parsed.messages[sequence] = OutgoingMessage(body[_MESSAGE.size : key_end], body[key_end:], bool(event),
                                                        sequence=sequence, logged=True)
        elif kind == _KIND_SETTLED and length % _SEQUENCE.size == 0:
            parsed.settled.update(value for (value,) in _SEQUENCE.iter_unpack(body))
        else:
            parsed.damaged = True
            break
        offset = body_start + length
    parsed.good_bytes = offset
    return parsed


def read_log(directory: Path) -> Recovered:
    """The unsettled messages in a log directory, without changing anything (for tools and tests)."""
    return _scan(directory, repair=False)[0]


def _scan(directory: Path, repair: bool) -> tuple[Recovered, list[_Segment]]:
    """Read every segment in order; with `repair`, cut torn tails off (so each is counted once). A file that
    is not a log of this version (nor a torn start of one) is counted and left alone, never deleted."""
    messages: dict[int, OutgoingMessage] = {}
    settled: set[int] = set()
    segments: list[_Segment] = []
    damaged, highest = 0, -1
    found = segment_files(directory)
    for number, path in found:
        try:
            data = path.read_bytes()
        except OSError as error:
            log.error("cannot read %s (%s); skipped", path, error)
            damaged += 1
            continue
        if not data.startswith(_FILE_MAGIC) and not _FILE_MAGIC.startswith(data):
            log.error("%s is not a spool log this vap can read (another version?); left as it is", path)
            damaged += 1
            continue
        parsed = parse_segment(data)
        if parsed.damaged:
            damaged += 1
            if repair:
                log.warning("%s is damaged at byte %d of %d (a crash mid-write?); kept the %d message record(s) "
                            "before it", path, parsed.good_bytes, len(data), len(parsed.messages))
                _truncate(path, parsed.good_bytes)
        first = max(min(parsed.messages, default=highest + 1), segments[-1].first_sequence if segments else 0)
        segments.append(_Segment(number, path, parsed.good_bytes if repair else len(data), first,
                                 set(parsed.messages)))
        messages.update(parsed.messages)
        settled |= parsed.settled
        highest = max([highest, *parsed.messages, *parsed.settled])
    for segment in segments:
        segment.last_written = max(segment.live, default=-1)
        segment.live -= settled
    live = [messages[sequence] for sequence in sorted(messages.keys() - settled)]
    last_number = found[-1][0] if found else 0
    return Recovered(live, highest + 1, damaged, sum(segment.size for segment in segments), last_number), segments


def _truncate(path: Path, size: int) -> None:
    try:
        with path.open("r+b") as handle:
            handle.truncate(size)
    except OSError as error:
        log.error("cannot cut the damaged tail off %s: %s", path, error)


def _first_sequence(segment: _Segment) -> int:
    return segment.first_sequence


def _frame(kind: int, body: bytes) -> bytes:
    return _FRAME.pack(zlib.crc32(body, zlib.crc32(bytes((kind,)))), kind, len(body)) + body


def encode_message(message: OutgoingMessage) -> bytes:
    return _frame(_KIND_MESSAGE, _MESSAGE.pack(message.sequence, message.event, len(message.key))
                  + message.key + message.value)


def message_record_bytes(message: OutgoingMessage) -> int:
    """What `encode_message` makes of the message, in bytes, without making it."""
    return _FRAME.size + _MESSAGE.size + len(message.key) + len(message.value)


def encode_settled(sequences: Sequence[int]) -> bytes:
    return _frame(_KIND_SETTLED, struct.pack(f">{len(sequences)}Q", *sequences))


class SpoolLog:
    """The log of one spool directory, used by the publisher's loop alone (not thread-safe).

    `recover` once at start, then `append` and `settle` what the delivery state reports, `sync_if_due` every
    turn, and `close` at stop. `write` is the system call, for tests to inject a full disk.
    """

    def __init__(self, directory: Path, segment_bytes: int, write: WriteFn = os.write) -> None:
        self._directory = directory
        self._segment_bytes = segment_bytes
        self._write = write
        self._segments: list[_Segment] = []
        self._fd: int | None = None
        self._dirty_since: float | None = None
        self._disk_bytes = 0
        self._next_number = 1
        self._next_sequence = 0
        self._lock_fd: int | None = None
        self._errors = RepeatedErrorLog(log)

    @property
    def disk_bytes(self) -> int:
        return self._disk_bytes

    @property
    def segments(self) -> int:
        return len(self._segments)

    def recover(self) -> Recovered:
        """Read what the previous runs left and forget the segments that hold nothing unsettled. Raises only
        `SpoolDirInUse`: an unreadable log is logged and started afresh."""
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            self._lock()
            recovered, self._segments = _scan(self._directory, repair=True)
        except OSError as error:
            log.error("cannot read the spool log in %s (%s); starting without what it held", self._directory, error)
            return Recovered([], 0, 1, 0)
        self._disk_bytes = recovered.disk_bytes
        self._next_number = recovered.last_segment_number + 1
        self._next_sequence = recovered.next_sequence
        self._reclaim()
        return recovered

    def append(self, messages: Sequence[OutgoingMessage], now: float) -> list[OutgoingMessage]:
        """Write messages (before they may be sent); returns those it could not write. However many come at once,
        a segment takes them only up to its size and the rest go on into the next: a segment bigger than that
        would stay on disk beside the bound until all of it was settled."""
        records = [encode_message(message) for message in messages]
        start = 0
        while start < len(messages):
            segment = self._writable_segment(len(records[start]))
            if segment is None:
                return list(messages[start:])
            end, size = start + 1, segment.size + len(records[start])
            while end < len(messages) and size + len(records[end]) <= self._segment_bytes:
                size += len(records[end])
                end += 1
            if not self._put(segment, b"".join(records[start:end]), now):
                return list(messages[start:])
            segment.live.update(message.sequence for message in messages[start:end])
            segment.last_written = max(segment.last_written, messages[end - 1].sequence)
            self._next_sequence = max(self._next_sequence, messages[end - 1].sequence + 1)
            start = end
        return []

    def settle(self, sequences: Iterable[int], now: float) -> None:
        """Record that messages need no resend; segments left with nothing unsettled are deleted, oldest first."""
        known = [sequence for sequence in sequences if self._discard(sequence)]
        if known:
            self._put_settled(known, now)
        self._reclaim()

    def forget_through(self, sequence: int) -> None:
        """Stop keeping messages up to `sequence` that the delivery state no longer holds (none should be)."""
        for segment in self._segments:
            if segment.first_sequence <= sequence:
                segment.live = {live for live in segment.live if live > sequence}
        self._reclaim()

    def last_sequence_of(self, index: int) -> int | None:
        """The largest sequence segment `index` (the oldest is 0) can hold, while there is a newer one to keep."""
        if index + 1 >= len(self._segments):
            return None
        return self._segments[index + 1].first_sequence - 1

    def delete_settled_segments(self, now: float) -> None:
        """Delete every settled segment but the newest, also those behind an older one still pinned by messages
        in flight. Their records may settle messages of those older segments, so every settlement of the older
        ones is written again, and synced, before anything goes: a crash then resends no message that was settled.
        Costs a record of the older segments' settled numbers, so it is for when the log needs the room."""
        self._reclaim()
        doomed = [segment for segment in self._segments[1:-1] if not segment.live]
        if not doomed:
            return
        pinned = [segment for segment in self._segments if segment.number < doomed[-1].number and segment.live]
        carried = [sequence for segment in pinned for sequence in segment.settled()]
        if carried:
            if not self._put_settled(carried, now):
                return
            self.sync()
        for segment in doomed:
            if not self._delete(segment):
                return

    def holds(self, sequence: int) -> bool:
        segment = self._segment_of(sequence)
        return segment is not None and sequence in segment.live

    def sync_if_due(self, now: float) -> None:
        if self._dirty_since is not None and now - self._dirty_since >= SYNC_INTERVAL_S:
            self.sync()

    def sync(self) -> None:
        if self._fd is None or self._dirty_since is None:
            return
        try:
            os.fsync(self._fd)
        except OSError as error:
            self._errors.error("cannot sync the spool log in %s: %s", self._directory, error)
        self._dirty_since = None

    def close(self) -> None:
        self.sync()
        self._drop_fd()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    # Inside

    def _lock(self) -> None:
        fd = os.open(self._directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SpoolDirInUse(f"kafka.spool.dir {self._directory} is in use by another vap process (pid "
                                f"{holder}); give each vap its own") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _writable_segment(self, room: int) -> _Segment | None:
        """The newest segment, unless it has less than `room` bytes left (and a record already) or belongs to an
        earlier run (whose tail may be torn)."""
        if self._fd is not None and self._segments and (self._segments[-1].size + room <= self._segment_bytes
                                                        or self._segments[-1].size <= len(_FILE_MAGIC)):
            return self._segments[-1]
        if self._fd is not None:
            self.sync()
            self._drop_fd()
        path = self._directory / f"spool-{self._next_number:012d}.log"
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        except OSError as error:
            self._errors.error("cannot create %s: %s; messages are kept in memory only", path, error)
            return None
        segment = _Segment(self._next_number, path, 0, self._next_sequence)
        self._next_number += 1
        self._segments.append(segment)
        if not self._put(segment, _FILE_MAGIC, None):
            self._drop_newest_segment()
            return None
        self._sync_directory()
        return segment

    def _put(self, segment: _Segment, data: bytes, now: float | None) -> bool:
        """Append all of `data` or nothing: a partial write is cut off again, so the segment never holds a
        tear in its middle, which would hide every record after it."""
        assert self._fd is not None
        written = 0
        try:
            while written < len(data):
                count = self._write(self._fd, data[written:])
                if count <= 0:
                    raise OSError(errno.ENOSPC, "no space left on device")
                written += count
        except OSError as error:
            self._errors.error("cannot write the spool log %s: %s; messages are kept in memory only",
                               segment.path, error)
            if written:
                try:
                    os.ftruncate(self._fd, segment.size)
                except OSError:
                    self._drop_fd()  # the next write opens a new segment; the tear stays at this one's end
            return False
        segment.size += len(data)
        self._disk_bytes += len(data)
        if self._dirty_since is None and now is not None:
            self._dirty_since = now
        return True

    def _segment_of(self, sequence: int) -> _Segment | None:
        index = bisect.bisect_right(self._segments, sequence, key=_first_sequence) - 1
        return self._segments[index] if index >= 0 else None

    def _discard(self, sequence: int) -> bool:
        segment = self._segment_of(sequence)
        if segment is None or sequence not in segment.live:
            return False
        segment.live.discard(sequence)
        return True

    def _reclaim(self) -> None:
        """Delete settled segments from the oldest end; the newest one stays open for writing."""
        while self._segments and not self._segments[0].live:
            oldest = self._segments[0]
            if oldest is self._segments[-1] and self._fd is not None:
                if oldest.size < self._segment_bytes:
                    return
                self._drop_fd()
            if not self._delete(oldest):
                return

    def _delete(self, segment: _Segment) -> bool:
        try:
            segment.path.unlink(missing_ok=True)
        except OSError as error:
            self._errors.error("cannot delete %s: %s", segment.path, error)
            return False
        self._disk_bytes -= segment.size
        self._segments.remove(segment)
        return True

    def _put_settled(self, sequences: Sequence[int], now: float) -> bool:
        record = encode_settled(sequences)
        segment = self._writable_segment(len(record))
        return segment is not None and self._put(segment, record, now)

    def _drop_newest_segment(self) -> None:
        segment = self._segments.pop()
        self._drop_fd()
        segment.path.unlink(missing_ok=True)

    def _drop_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _sync_directory(self) -> None:
        """A new segment's name must survive a power cut too."""
        try:
            handle = os.open(self._directory, os.O_RDONLY)
        except OSError:
            return
        with contextlib.suppress(OSError):
            os.fsync(handle)
        os.close(handle)
