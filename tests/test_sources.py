"""Reader state machine and frame accounting, with scripted fake decoders."""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry

from pipeline.batching import FrameHub
from pipeline.config import StreamConfig
from pipeline.frames import Frame
from pipeline.health import Heartbeats
from pipeline.metrics import PipelineMetrics
from pipeline.sources import ALLOWED_TRANSITIONS, StreamReader, StreamState, max_age_for, overflow_policy_for
from tests.conftest import wait_until
from tests.fakes import FakeSource, GarbageThenGoodSource, make_frame


class ReaderHarness:
    def __init__(self, config: StreamConfig, source: FakeSource, capacity: int = 1000) -> None:
        self.registry = CollectorRegistry()
        metrics = PipelineMetrics(self.registry)
        metrics.add_stream(config.id)
        self.hub = FrameHub()
        self.hub.add_stream(config.id, capacity, overflow_policy_for(config))
        self.reader = StreamReader(config, self.hub, metrics, Heartbeats(metrics), lambda _config: source)

    def frames(self) -> list[Frame]:
        batch = self.hub.take_batch(max_batch=1000, max_wait_s=0.0, max_per_stream=1000, poll_s=0.01)
        return [] if batch is None else list(batch.frames)

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, {"stream": "s", **labels}) or 0.0


def file_stream(**fields: object) -> StreamConfig:
    return StreamConfig.model_validate({"id": "s", "url": "/clips/x.mp4", "realtime": False, **fields})


def live_stream(**fields: object) -> StreamConfig:
    return StreamConfig.model_validate(
        {"id": "s", "url": "rtsp://cam/s", "reconnect_backoff_s": 0.01, "reconnect_backoff_max_s": 0.02, **fields}
    )


def test_file_read_as_fast_as_possible_delivers_every_frame_then_stops() -> None:
    harness = ReaderHarness(file_stream(), FakeSource(frames=30))
    harness.reader.start()
    assert harness.reader.finished.wait(5)
    assert [f.frame_id for f in harness.frames()] == list(range(30))
    assert harness.reader.state is StreamState.STOPPED
    assert harness.value("vap_frames_read_total") == 30


def test_looping_file_restarts_with_increasing_frame_ids() -> None:
    harness = ReaderHarness(file_stream(loop=True), FakeSource(frames=5))
    harness.reader.start()
    assert wait_until(lambda: harness.value("vap_frames_read_total") >= 12)
    harness.reader.stop()
    assert harness.reader.join(2)
    ids = [f.frame_id for f in harness.frames()]
    assert ids[:12] == list(range(12))
    assert harness.value("vap_stream_reconnects_total") == 0


def test_realtime_file_is_paced_at_its_frame_rate() -> None:
    harness = ReaderHarness(file_stream(realtime=True), FakeSource(frames=6, fps=20.0))
    started = time.monotonic()
    harness.reader.start()
    assert harness.reader.finished.wait(5)
    assert time.monotonic() - started >= 5 / 20.0 * 0.9
    assert len(harness.frames()) == 6


def test_fps_cap_drops_and_counts_frames_above_the_rate() -> None:
    harness = ReaderHarness(file_stream(fps=5), FakeSource(frames=20, fps=20.0))
    harness.reader.start()
    assert harness.reader.finished.wait(5)
    assert [f.frame_id for f in harness.frames()] == [0, 4, 8, 12, 16]
    assert harness.value("vap_frames_dropped_total", reason="fps_cap") == 15


def test_failed_first_connect_backs_off_and_retries_like_a_later_drop() -> None:
    source = FakeSource(frames=3, open_results=[False, False, True])
    harness = ReaderHarness(live_stream(), source)
    harness.reader.start()
    assert wait_until(lambda: harness.value("vap_frames_read_total") >= 3)
    assert harness.value("vap_stream_reconnects_total") >= 2
    harness.reader.stop()
    assert harness.reader.join(2)
    assert harness.reader.state is StreamState.STOPPED
    assert harness.value("vap_stream_up") == 0


def test_live_stream_that_ends_reconnects_and_frame_ids_keep_increasing() -> None:
    harness = ReaderHarness(live_stream(), FakeSource(frames=4))
    harness.reader.start()
    assert wait_until(lambda: harness.value("vap_frames_read_total") >= 10)
    harness.reader.stop()
    assert harness.reader.join(2)
    ids = [f.frame_id for f in harness.frames()]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert harness.value("vap_stream_reconnects_total") >= 2


def test_live_buffer_keeps_the_freshest_frames_and_counts_queue_full() -> None:
    harness = ReaderHarness(live_stream(), FakeSource(frames=50), capacity=3)
    harness.reader.start()
    assert wait_until(lambda: harness.value("vap_frames_read_total") >= 50)
    harness.reader.stop()
    harness.reader.join(2)
    assert harness.value("vap_frames_dropped_total", reason="queue_full") >= 47 - 3


def test_stop_during_backoff_ends_promptly() -> None:
    config = StreamConfig.model_validate(
        {"id": "s", "url": "rtsp://cam/s", "reconnect_backoff_s": 30, "reconnect_backoff_max_s": 60}
    )
    harness = ReaderHarness(config, FakeSource(frames=0, open_results=[False]))
    harness.reader.start()
    assert wait_until(lambda: harness.reader.state is StreamState.BACKOFF)
    started = time.monotonic()
    harness.reader.stop()
    assert harness.reader.join(2)
    assert time.monotonic() - started < 1


def test_every_state_can_reach_stopped_and_stopped_is_final() -> None:
    for state, targets in ALLOWED_TRANSITIONS.items():
        if state is not StreamState.STOPPED:
            assert StreamState.STOPPED in targets
    assert ALLOWED_TRANSITIONS[StreamState.STOPPED] == frozenset()


def test_threads_are_named_after_their_stream() -> None:
    harness = ReaderHarness(file_stream(), FakeSource(frames=1))
    assert harness.reader.thread_name == "reader-s"


def test_unusable_frames_at_start_are_skipped_and_counted_as_decode_errors() -> None:
    harness = ReaderHarness(file_stream(), GarbageThenGoodSource(garbage=3, frames=4))
    harness.reader.start()
    assert harness.reader.finished.wait(5)
    assert [f.frame_id for f in harness.frames()] == [0, 1, 2, 3]
    assert harness.value("vap_frames_dropped_total", reason="decode_error") == 3


def test_frames_older_than_the_staleness_budget_are_dropped_as_stale() -> None:
    config = live_stream(max_staleness_ms=50)
    stale: list[Frame] = []
    hub = FrameHub(on_stale=stale.append)
    hub.add_stream("s", 10, overflow_policy_for(config), max_age_for(config))
    stop = threading.Event()
    old = make_frame("s", 0)
    hub.put(old, stop)
    time.sleep(0.1)
    hub.put(make_frame("s", 1), stop)
    batch = hub.take_batch(max_batch=4, max_wait_s=0.0, max_per_stream=4)
    assert batch is not None and [f.frame_id for f in batch.frames] == [1]
    assert stale == [old]


def test_files_read_as_fast_as_possible_are_never_stale() -> None:
    assert max_age_for(file_stream()) is None
    assert max_age_for(file_stream(realtime=True)) == 2.0
