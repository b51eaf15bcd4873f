"""The spool's write-ahead log on its own: what it keeps, what a tear or a full disk costs, and how it cleans up."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pipeline.publishing.spool import OutgoingMessage
from pipeline.publishing.spool_log import SpoolDirInUse, SpoolLog, read_log


def messages(sequences: range, size: int = 100) -> list[OutgoingMessage]:
    return [OutgoingMessage(b"cam-%d" % (sequence % 3), b"%06d" % sequence + b"x" * size, event=sequence % 5 == 0,
                            sequence=sequence, logged=True) for sequence in sequences]


def recovered_sequences(directory: Path) -> list[int]:
    return [message.sequence for message in read_log(directory).messages]


def test_unsettled_messages_come_back_in_order_with_their_lane_and_numbering_goes_on(tmp_path: Path) -> None:
    log = SpoolLog(tmp_path, segment_bytes=1024)
    assert log.recover().messages == []
    written = messages(range(20))
    assert log.append(written[:12], now=0) == [] and log.append(written[12:], now=0) == []
    log.settle([0, 1, 2, 3, 7, 19], now=0)
    log.close()
    again = SpoolLog(tmp_path, segment_bytes=1024)
    recovered = again.recover()
    assert [m.sequence for m in recovered.messages] == [4, 5, 6, *range(8, 19)]
    assert [(m.key, m.value, m.event) for m in recovered.messages] == \
        [(m.key, m.value, m.event) for m in written if m.sequence in {4, 5, 6, *range(8, 19)}]
    assert recovered.next_sequence == 20 and recovered.damaged == 0
    assert all(m.logged for m in recovered.messages), "their settlement will be logged"


def test_settled_segments_are_deleted_oldest_first_and_the_size_on_disk_follows(tmp_path: Path) -> None:
    log = SpoolLog(tmp_path, segment_bytes=1024)
    log.recover()
    log.append(messages(range(40)), now=0)
    for start in range(0, 40, 8):
        log.append(messages(range(40 + start, 48 + start)), now=0)  # one segment per append once they fill
    assert log.segments > 3
    log.settle(range(8, 80), now=0)
    assert log.segments > 3, "message 0 still waits: nothing after its segment may go before it"
    log.settle([0, *range(1, 8)], now=0)
    assert log.segments == 1
    assert log.disk_bytes == sum(path.stat().st_size for path in tmp_path.glob("spool-*.log"))
    assert recovered_sequences(tmp_path) == []


@pytest.mark.parametrize("restart", [False, True], ids=["same-run", "after-a-restart"])
def test_settled_segments_behind_a_pinned_one_go_and_a_crash_resends_none_of_their_settled_messages(
        tmp_path: Path, restart: bool) -> None:
    """Messages 0 and 1 are in flight to a broker that went away; everything after them is settled, mostly by
    records in the segments that go. The settlements of the pinned segment are written again first, so the next
    start resends 0 and 1 and the unsettled newest, nothing else (also after a restart, which reads back what is
    settled in each segment)."""
    log = SpoolLog(tmp_path, segment_bytes=1024)
    log.recover()
    log.append(messages(range(14)), now=0)
    log.settle(range(2, 7), now=0)  # recorded in the second segment, which goes
    log.append(messages(range(14, 44)), now=0)
    log.settle(range(7, 40), now=0)
    if restart:
        log.close()
        log = SpoolLog(tmp_path, segment_bytes=1024)
        log.recover()
    before = log.segments
    pinned = log.last_sequence_of(0)
    assert before > 3 and pinned is not None and pinned >= 2, "the oldest segment holds settled messages too"

    log.delete_settled_segments(now=0)

    # The four settled ones between the pinned oldest and the one that holds 40 and 41 went; after a restart the
    # settlements are written again into a new segment, as a previous run's last one is never written to again.
    assert log.segments == before - 4 + restart
    assert log.disk_bytes == sum(path.stat().st_size for path in tmp_path.glob("spool-*.log"))
    log.close()
    assert recovered_sequences(tmp_path) == [0, 1, 40, 41, 42, 43]


def test_messages_written_at_once_fill_segments_to_their_size_and_go_on_into_the_next(tmp_path: Path) -> None:
    """The publisher writes what arrived since its last turn in one go; a segment that took all of it would stay
    on disk, beyond kafka.spool.max_bytes, until every message in it was settled."""
    log = SpoolLog(tmp_path, segment_bytes=1024)
    log.recover()
    assert log.append(messages(range(40)), now=0) == []
    sizes = [path.stat().st_size for path in sorted(tmp_path.glob("spool-*.log"))]
    assert len(sizes) >= 5 and max(sizes) <= 1024, sizes
    log.close()
    assert recovered_sequences(tmp_path) == list(range(40))


def test_a_log_cut_in_the_middle_of_a_record_keeps_the_records_before_it_and_counts_the_tear_once(
        tmp_path: Path) -> None:
    log = SpoolLog(tmp_path, segment_bytes=1 << 20)
    log.recover()
    log.append(messages(range(5)), now=0)
    log.close()
    [segment] = tmp_path.glob("spool-*.log")
    data = segment.read_bytes()
    segment.write_bytes(data[: len(data) - 60])  # inside the fifth record: a power cut mid-write
    recovered = SpoolLog(tmp_path, segment_bytes=1 << 20)
    found = recovered.recover()
    assert [m.sequence for m in found.messages] == [0, 1, 2, 3] and found.damaged == 1
    assert recovered.append(messages(range(5, 7)), now=0) == []
    recovered.close()
    again = SpoolLog(tmp_path, segment_bytes=1 << 20).recover()
    assert [m.sequence for m in again.messages] == [0, 1, 2, 3, 5, 6]
    assert again.damaged == 0, "the torn tail was cut off at the first start after it"


def test_a_corrupt_record_ends_what_its_segment_gives_and_other_segments_still_count(tmp_path: Path) -> None:
    log = SpoolLog(tmp_path, segment_bytes=200)
    log.recover()
    for sequence in range(6):
        log.append(messages(range(sequence, sequence + 1), size=300), now=0)
    log.close()
    segments = sorted(tmp_path.glob("spool-*.log"))
    assert len(segments) == 6
    data = bytearray(segments[1].read_bytes())
    data[-50] ^= 0xFF  # a flipped bit in the value
    segments[1].write_bytes(bytes(data))
    segments[3].write_bytes(b"VAPLOG9\n a later version")
    log = SpoolLog(tmp_path, segment_bytes=200)
    found = log.recover()
    assert [m.sequence for m in found.messages] == [0, 2, 4, 5] and found.damaged == 2
    log.settle(range(6), now=0)
    log.append(messages(range(6, 7)), now=0)
    assert segments[3].read_bytes() == b"VAPLOG9\n a later version", "a file it cannot read is never touched"
    assert not segments[0].exists(), "settled segments go"


class FullDisk:
    """`os.write` until `fail_after` bytes, then half of one more write and ENOSPC, until freed."""

    def __init__(self, fail_after: int) -> None:
        self.left = fail_after
        self.full = False

    def __call__(self, fd: int, data: bytes) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        if len(data) > self.left:
            self.full = True
            return os.write(fd, data[: max(1, len(data) // 2)])
        self.left -= len(data)
        return os.write(fd, data)

    def free(self) -> None:
        self.full, self.left = False, 1 << 30


def test_a_full_disk_loses_only_the_messages_it_could_not_take_and_leaves_no_tear(tmp_path: Path) -> None:
    disk = FullDisk(fail_after=800)
    log = SpoolLog(tmp_path, segment_bytes=1 << 20, write=disk)
    log.recover()
    assert log.append(messages(range(4)), now=0) == []
    unwritten = log.append(messages(range(4, 10)), now=0)
    assert [m.sequence for m in unwritten] == list(range(4, 10)), "a batch is written whole or not at all"
    assert log.append(messages(range(10, 12)), now=0) != []
    log.settle([1], now=0)  # cannot be written either; settling must not raise
    disk.free()
    assert log.append(messages(range(12, 14)), now=0) == []
    log.close()
    found = SpoolLog(tmp_path, segment_bytes=1 << 20).recover()
    assert [m.sequence for m in found.messages] == [0, 1, 2, 3, 12, 13], \
        "an unwritten settlement means a resend, never a loss"
    assert found.damaged == 0, "the half-written batch was cut off again"


def test_an_unreadable_log_directory_starts_empty_rather_than_crashing(tmp_path: Path) -> None:
    blocker = tmp_path / "spool"
    blocker.write_text("a file where the directory should be")
    log = SpoolLog(blocker, segment_bytes=4096)
    found = log.recover()
    assert found.messages == [] and found.damaged == 1
    assert log.append(messages(range(2)), now=0) != [], "nothing can be written: the caller counts it"


def test_writes_are_synced_half_a_second_after_the_first_unsynced_one_not_one_by_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr("pipeline.publishing.spool_log.os.fsync", synced.append)
    log = SpoolLog(tmp_path, segment_bytes=1 << 20)
    log.recover()
    log.append(messages(range(1)), now=10.0)
    baseline = len(synced)  # a new segment syncs its directory entry
    for step in range(1, 5):
        log.append(messages(range(step, step + 1)), now=10.0 + step / 10)
        log.sync_if_due(10.0 + step / 10)
    assert len(synced) == baseline, "no sync before half a second has passed"
    log.sync_if_due(10.5)
    assert len(synced) == baseline + 1
    log.sync_if_due(10.9)
    assert len(synced) == baseline + 1, "nothing new to sync"


def test_a_second_vap_on_the_same_spool_dir_is_refused_naming_the_first(tmp_path: Path) -> None:
    first = SpoolLog(tmp_path, segment_bytes=4096)
    first.recover()
    with pytest.raises(SpoolDirInUse, match=f"in use by another vap process \\(pid {os.getpid()}\\)"):
        SpoolLog(tmp_path, segment_bytes=4096).recover()
    first.close()
    SpoolLog(tmp_path, segment_bytes=4096).recover()
