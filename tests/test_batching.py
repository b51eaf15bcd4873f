"""Batching semantics: fairness across streams, partial batches on timeout, buffer policies."""

from __future__ import annotations

import threading
import time

from pipeline.batching.hub import FrameHub, OverflowPolicy
from pipeline.inference.devices import worker_for_decoder
from tests.fakes import make_frame


def hub_with(streams: dict[str, int], capacity: int = 64, policy: OverflowPolicy = OverflowPolicy.WAIT) -> FrameHub:
    hub = FrameHub()
    stop = threading.Event()
    for stream_id, count in streams.items():
        hub.add_stream(stream_id, capacity, policy)
        for frame_id in range(count):
            assert hub.put(make_frame(stream_id, frame_id), stop) is None
    return hub


def test_a_busy_stream_cannot_starve_the_others() -> None:
    hub = hub_with({"busy": 40, "quiet-1": 2, "quiet-2": 2})
    batch = hub.take_batch(max_batch=6, max_wait_s=0.0, max_per_stream=6)
    assert batch is not None
    streams = [frame.stream_id for frame in batch.frames]
    assert streams.count("quiet-1") == 2 and streams.count("quiet-2") == 2 and streams.count("busy") == 2


def test_max_same_source_frames_caps_one_stream_per_batch() -> None:
    hub = hub_with({"only": 10})
    batch = hub.take_batch(max_batch=8, max_wait_s=0.05, max_per_stream=3)
    assert batch is not None and len(batch.frames) == 3


def test_round_robin_start_rotates_between_batches() -> None:
    hub = hub_with({"a": 10, "b": 10, "c": 10})
    firsts = []
    for _ in range(3):
        batch = hub.take_batch(max_batch=1, max_wait_s=0.0, max_per_stream=1)
        assert batch is not None
        firsts.append(batch.frames[0].stream_id)
    assert sorted(firsts) == ["a", "b", "c"]


def test_partial_batch_leaves_after_max_wait() -> None:
    hub = hub_with({"a": 2})
    started = time.monotonic()
    batch = hub.take_batch(max_batch=16, max_wait_s=0.15, max_per_stream=16)
    waited = time.monotonic() - started
    assert batch is not None and len(batch.frames) == 2
    assert 0.1 <= waited < 2.0


def test_frames_keep_their_order_within_a_stream() -> None:
    hub = hub_with({"a": 5, "b": 5})
    batch = hub.take_batch(max_batch=10, max_wait_s=0.0, max_per_stream=10)
    assert batch is not None
    for stream_id in ("a", "b"):
        ids = [f.frame_id for f in batch.frames if f.stream_id == stream_id]
        assert ids == sorted(ids) == list(range(5))


def test_empty_hub_returns_none_after_poll_so_the_worker_can_stop() -> None:
    hub = hub_with({"a": 0})
    assert hub.take_batch(max_batch=4, max_wait_s=0.01, max_per_stream=4, poll_s=0.05) is None


def test_drop_oldest_keeps_the_freshest_frames_and_reports_the_dropped_one() -> None:
    hub = FrameHub()
    hub.add_stream("live", 2, OverflowPolicy.DROP_OLDEST)
    stop = threading.Event()
    dropped = [hub.put(make_frame("live", frame_id), stop) for frame_id in range(5)]
    assert [(d[0].frame_id, d[1]) for d in dropped if d is not None] == [(0, "queue_full"), (1, "queue_full"),
                                                                         (2, "queue_full")]
    batch = hub.take_batch(max_batch=4, max_wait_s=0.0, max_per_stream=4)
    assert batch is not None and [f.frame_id for f in batch.frames] == [3, 4]


def test_wait_policy_blocks_the_reader_instead_of_dropping() -> None:
    hub = FrameHub()
    hub.add_stream("file", 1, OverflowPolicy.WAIT)
    stop = threading.Event()
    assert hub.put(make_frame("file", 0), stop) is None
    outcome: list[object] = []
    writer = threading.Thread(target=lambda: outcome.append(hub.put(make_frame("file", 1), stop)))
    writer.start()
    writer.join(0.2)
    assert writer.is_alive(), "a full WAIT buffer must block the reader"
    batch = hub.take_batch(max_batch=1, max_wait_s=0.0, max_per_stream=1)
    assert batch is not None and batch.frames[0].frame_id == 0
    writer.join(2)
    assert outcome == [None]


def test_stop_releases_a_reader_blocked_on_a_full_buffer() -> None:
    hub = FrameHub()
    hub.add_stream("file", 1, OverflowPolicy.WAIT)
    stop = threading.Event()
    hub.put(make_frame("file", 0), stop)
    writer = threading.Thread(target=hub.put, args=(make_frame("file", 1), stop))
    writer.start()
    stop.set()
    writer.join(2)
    assert not writer.is_alive()


def test_drained_accounts_for_batches_still_in_the_model() -> None:
    hub = hub_with({"a": 2})
    batch = hub.take_batch(max_batch=4, max_wait_s=0.0, max_per_stream=4)
    assert batch is not None
    assert not hub.drained()
    hub.batch_done(batch)
    assert hub.drained()


def test_streams_decoded_on_a_gpu_go_to_that_gpus_worker_whatever_the_load() -> None:
    devices = ["cuda:0", "cuda:1"]
    hub = FrameHub(workers=2)
    stop = threading.Event()
    for stream_id, decoder in (("a", "cuda:1"), ("b", "cuda:1"), ("c", "cpu"), ("d", "cuda"), ("e", "cuda:2")):
        hub.add_stream(stream_id, 8, OverflowPolicy.WAIT, worker=worker_for_decoder(decoder, devices))
        hub.put(make_frame(stream_id, 0), stop)
    taken = {}
    for worker in (0, 1):
        batch = hub.take_batch(max_batch=8, max_wait_s=0.0, max_per_stream=8, worker=worker)
        assert batch is not None
        taken[worker] = {frame.stream_id for frame in batch.frames}
    assert taken[1] >= {"a", "b"} and "d" in taken[0], taken
    assert taken[0] | taken[1] == {"a", "b", "c", "d", "e"}, "cpu and unknown GPUs go to the least loaded worker"
    assert worker_for_decoder("cpu", devices) is None and worker_for_decoder("cuda:2", devices) is None


def test_with_two_workers_each_stream_belongs_to_one_and_load_is_split() -> None:
    hub = FrameHub(workers=2)
    stop = threading.Event()
    for stream_id in ("a", "b", "c", "d"):
        hub.add_stream(stream_id, 64, OverflowPolicy.WAIT)
        for frame_id in range(4):
            hub.put(make_frame(stream_id, frame_id), stop)
    owners: dict[int, set[str]] = {0: set(), 1: set()}
    for worker in (0, 1):
        batch = hub.take_batch(max_batch=16, max_wait_s=0.0, max_per_stream=8, worker=worker)
        assert batch is not None
        owners[worker] |= {frame.stream_id for frame in batch.frames}
        hub.batch_done(batch)
        assert len(batch.frames) == 8
    assert len(owners[0]) == 2 and len(owners[1]) == 2
    assert not owners[0] & owners[1]
    assert owners[0] | owners[1] == {"a", "b", "c", "d"}
    assert hub.drained()


def test_with_two_workers_taking_turns_every_stream_gets_an_equal_share() -> None:
    hub = FrameHub()
    hub.set_workers(2)
    stop = threading.Event()
    streams = ["s0", "s1", "s2", "s3"]
    for stream_id in streams:
        hub.add_stream(stream_id, 1000, OverflowPolicy.WAIT)
        for frame_id in range(300):
            assert hub.put(make_frame(stream_id, frame_id), stop) is None
    taken = dict.fromkeys(streams, 0)
    for turn in range(200):
        batch = hub.take_batch(max_batch=3, max_wait_s=0.0, max_per_stream=3, worker=turn % 2)
        assert batch is not None
        for frame in batch.frames:
            taken[frame.stream_id] += 1
        hub.batch_done(batch)
    assert max(taken.values()) - min(taken.values()) <= 3, taken


def test_a_frame_that_already_waited_max_wait_leaves_at_once_in_a_partial_batch() -> None:
    hub = hub_with({"a": 2})
    time.sleep(0.3)  # the batcher was busy with the previous batch meanwhile
    started = time.monotonic()
    batch = hub.take_batch(max_batch=16, max_wait_s=0.25, max_per_stream=16)
    assert batch is not None and len(batch.frames) == 2
    assert time.monotonic() - started < 0.15, "the wait counted from the batcher's wake-up, not the frame's arrival"


def test_a_partial_batch_leaves_when_its_first_frame_has_waited_max_wait() -> None:
    hub = hub_with({"a": 1})
    arrived = time.monotonic()
    time.sleep(0.15)
    batch = hub.take_batch(max_batch=16, max_wait_s=0.4, max_per_stream=16)
    waited = time.monotonic() - arrived
    assert batch is not None and len(batch.frames) == 1
    assert 0.35 <= waited < 0.5
