"""Reader state machine and frame accounting, with scripted fake decoders."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from pipeline.batching.hub import FrameHub
from pipeline.config import StreamConfig
from pipeline.frames import Frame
from pipeline.sources.pyav import PyAvSource, rtsp_options
from pipeline.sources.reader import ALLOWED_TRANSITIONS, StreamReader, StreamState, max_age_for, overflow_policy_for
from pipeline.sources.source import InvalidFrame, VideoSource
from tests.conftest import wait_until
from tests.fakes import FakeSource, GarbageThenGoodSource, Stages, make_frame


class ReaderHarness:
    def __init__(
        self, config: StreamConfig, source: FakeSource | Callable[[StreamConfig], VideoSource], capacity: int = 1000
    ) -> None:
        self.stages = Stages()
        self.registry = self.stages.registry
        run = self.stages.add_stream(config.id)
        self.hub = FrameHub()
        self.hub.add_stream(config.id, capacity, overflow_policy_for(config))
        self.heartbeats = self.stages.heartbeats
        factory = source if callable(source) else lambda _config: source
        self.reader = StreamReader(config, run, self.hub, self.stages.ledger, self.stages.metrics, self.heartbeats,
                                   factory)

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


def test_unusable_frames_at_start_are_read_dropped_as_decode_errors_and_leave_a_gap_in_frame_ids() -> None:
    harness = ReaderHarness(file_stream(), GarbageThenGoodSource(garbage=3, frames=4))
    harness.reader.start()
    assert harness.reader.finished.wait(5)
    assert [f.frame_id for f in harness.frames()] == [3, 4, 5, 6]
    assert harness.value("vap_frames_dropped_total", reason="decode_error") == 3
    assert harness.value("vap_frames_read_total") == 7


def test_a_file_whose_every_frame_fails_to_decode_was_read_but_never_gave_a_frame() -> None:
    harness = ReaderHarness(file_stream(reconnect_backoff_s=0.01, reconnect_backoff_max_s=0.02),
                            GarbageThenGoodSource(garbage=5, frames=0))
    harness.reader.start()
    assert harness.reader.finished.wait(10), "a file that never decodes is given up after a few tries"
    assert harness.value("vap_frames_read_total") == 5
    assert not harness.reader.ever_read, "vap run would report success for a file it could not decode"


def test_a_file_that_decodes_gave_a_frame() -> None:
    harness = ReaderHarness(file_stream(), GarbageThenGoodSource(garbage=1, frames=2))
    harness.reader.start()
    assert harness.reader.finished.wait(5)
    assert harness.reader.ever_read


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


def test_fps_cap_keeps_the_configured_rate_when_the_source_rate_is_not_a_multiple_of_it() -> None:
    harness = ReaderHarness(file_stream(fps=10), FakeSource(frames=250, fps=25.0))
    harness.reader.start()
    assert harness.reader.finished.wait(5)
    kept = len(harness.frames())
    assert 99 <= kept <= 101, f"{kept} frames kept from 10 s at 25 fps capped at 10 fps"
    assert harness.value("vap_frames_dropped_total", reason="fps_cap") == 250 - kept


class SlowOpenSource(FakeSource):
    def __init__(self, open_s: float) -> None:
        super().__init__(frames=0, open_results=[False])
        self._open_s = open_s

    def open(self) -> bool:
        time.sleep(self._open_s)
        return super().open()


def test_a_reader_waiting_in_an_open_or_a_long_backoff_is_not_reported_stuck() -> None:
    config = StreamConfig.model_validate({"id": "s", "url": "rtsp://cam/s", "open_timeout_ms": 1000,
                                          "reconnect_backoff_s": 2.5, "reconnect_backoff_max_s": 2.5})
    stages = Stages()
    run = stages.add_stream("s")
    hub = FrameHub()
    hub.add_stream("s", 10, overflow_policy_for(config))
    heartbeats = stages.heartbeats
    reader = StreamReader(config, run, hub, stages.ledger, stages.metrics, heartbeats,
                          lambda _config: SlowOpenSource(open_s=1.2))
    reader.start()
    seen: set[StreamState] = set()
    deadline = time.monotonic() + 4.0
    try:
        while time.monotonic() < deadline:
            seen.add(reader.state)
            assert heartbeats.stuck(max_age_s=1.1) == [], f"reported stuck while {reader.state.value}"
            time.sleep(0.05)
    finally:
        reader.stop()
        assert reader.join(3)
    assert {StreamState.CONNECTING, StreamState.BACKOFF} <= seen


def test_an_offline_rtsp_camera_fails_its_open_at_once() -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    camera = PyAvSource(StreamConfig.model_validate(
        {"id": "cam", "url": f"rtsp://viewer:secret@127.0.0.1:{port}/live", "open_timeout_ms": 3000}))
    started = time.monotonic()
    assert camera.open() is False
    assert time.monotonic() - started < 1.0


def test_each_rtsp_open_carries_its_own_ffmpeg_options_and_the_environment_is_never_touched() -> None:
    tcp = StreamConfig.model_validate({"id": "a", "url": "rtsp://cam/a"})
    udp = StreamConfig.model_validate({"id": "b", "url": "rtsp://cam/b", "transport": "udp"})
    assert rtsp_options(tcp) == {"rtsp_transport": "tcp", "fpsprobesize": "0"}
    assert rtsp_options(udp)["rtsp_transport"] == "udp"
    before = dict(os.environ)
    PyAvSource(StreamConfig.model_validate({"id": "c", "url": "rtsp://127.0.0.1:1/x", "open_timeout_ms": 500})).open()
    assert dict(os.environ) == before


def test_a_file_that_never_opens_or_never_gives_a_frame_is_given_up_so_the_run_can_finish() -> None:
    for source in (FakeSource(frames=0, open_results=[False] * 10), FakeSource(frames=0)):
        harness = ReaderHarness(file_stream(loop=True, reconnect_backoff_s=0.01), source)
        harness.reader.start()
        assert harness.reader.finished.wait(5), "the reader retried the file for ever"
        assert harness.reader.state is StreamState.STOPPED and source.opened == 3


def test_a_looping_file_that_has_given_frames_is_retried_like_a_camera_when_it_fails_to_open() -> None:
    source = FakeSource(frames=5, open_results=[True, False, False, False, False, True])
    harness = ReaderHarness(file_stream(loop=True, reconnect_backoff_s=0.01, reconnect_backoff_max_s=0.02), source)
    harness.reader.start()
    assert wait_until(lambda: harness.value("vap_frames_read_total") >= 15)
    assert not harness.reader.finished.is_set()
    harness.reader.stop()
    assert harness.reader.join(2)


class RaisingSource(FakeSource):
    """Fails in `open` or `read` with an exception no decoder documents, like getaddrinfo's UnicodeError for a
    host name such as `cam..site.local`, or a cv2.error from a read."""

    def __init__(self, fail_in: str | None, frames: int = 100) -> None:
        super().__init__(frames=frames)
        self._fail_in = fail_in

    def open(self) -> bool:
        if self._fail_in == "open":
            raise UnicodeError("encoding with 'idna' codec failed (UnicodeError: label empty or too long)")
        return super().open()

    def read(self) -> npt.NDArray[np.uint8] | None:
        if self._fail_in == "read":
            raise cv2.error("OpenCV(4.9.0) error: (-215:Assertion failed) in function 'read'")
        return super().read()


@pytest.mark.parametrize("fail_in", ["open", "read"])
def test_an_unexpected_error_fails_that_attempt_and_the_stream_is_tried_again(
    fail_in: str, caplog: pytest.LogCaptureFixture
) -> None:
    attempts: list[RaisingSource] = []

    def factory(_config: StreamConfig) -> RaisingSource:
        attempts.append(RaisingSource(fail_in if len(attempts) < 3 else None))
        return attempts[-1]

    harness = ReaderHarness(live_stream(), factory)
    caplog.set_level(logging.WARNING, logger="pipeline.sources.reader")
    harness.reader.start()
    try:
        assert wait_until(lambda: harness.reader.state is StreamState.UP), harness.reader.state
        assert wait_until(lambda: len(harness.frames()) >= 3)
    finally:
        harness.reader.stop()
        assert harness.reader.join(2)
    assert len(attempts) >= 4
    errors = [record for record in caplog.records if "unexpected failure" in record.getMessage()]
    assert len(errors) == 1 and "Traceback" in errors[0].getMessage(), "one traceback for one kind of failure"
    assert sum("failed again" in record.getMessage() for record in caplog.records) == 2


def test_a_camera_host_name_that_cannot_be_looked_up_fails_its_open_instead_of_raising() -> None:
    camera = PyAvSource(StreamConfig.model_validate({"id": "cam", "url": "rtsp://cam..site.local/x"}))
    assert camera.open() is False


class NoMediaSource(FakeSource):
    """Takes the session, then no frame comes: each read gives up after the read timeout."""

    def __init__(self, read_timeout_s: float) -> None:
        super().__init__(frames=0)
        self._read_timeout_s = read_timeout_s

    def read(self) -> npt.NDArray[np.uint8] | None:
        time.sleep(self._read_timeout_s)
        return None


def test_a_camera_that_opens_but_sends_no_frame_is_never_up() -> None:
    source = NoMediaSource(read_timeout_s=0.1)
    harness = ReaderHarness(live_stream(), source)
    harness.reader.start()
    try:
        deadline = time.monotonic() + 5
        while source.opened < 4 and time.monotonic() < deadline:
            assert harness.reader.state is not StreamState.UP
            assert harness.value("vap_stream_up") == 0
            time.sleep(0.005)
        assert source.opened >= 4
    finally:
        harness.reader.stop()
        assert harness.reader.join(2)


def test_a_stream_is_up_from_its_first_frame() -> None:
    harness = ReaderHarness(live_stream(), FakeSource(frames=10**6))
    harness.reader.start()
    try:
        assert wait_until(lambda: harness.value("vap_frames_read_total") >= 1)
        assert harness.reader.state is StreamState.UP and harness.value("vap_stream_up") == 1
    finally:
        harness.reader.stop()
        assert harness.reader.join(2)


class GarbageAtSource(FakeSource):
    """Frames whose read numbers are in `garbage` decode to nothing usable, like a corrupt packet mid-stream."""

    def __init__(self, frames: int, garbage: Sequence[int]) -> None:
        super().__init__(frames=frames)
        self._garbage = set(garbage)
        self._reads = 0

    def read(self) -> npt.NDArray[np.uint8] | None:
        self._reads += 1
        if self._reads in self._garbage:
            raise InvalidFrame("corrupt packet")
        return super().read()


def test_a_frame_lost_to_a_decode_error_is_read_and_dropped_and_its_id_is_skipped() -> None:
    harness = ReaderHarness(file_stream(), GarbageAtSource(frames=4, garbage=[2, 4]))
    harness.reader.start()
    assert harness.reader.finished.wait(5)
    taken = harness.frames()
    assert [f.frame_id for f in taken] == [0, 2, 4, 5]
    read = harness.value("vap_frames_read_total")
    assert read == 6 == len(taken) + harness.value("vap_frames_dropped_total", reason="decode_error")


class JumpingSource(FakeSource):
    """A recording starting at `start_s` whose timestamps jump by `jump_s` after `before` frames (a cut, a
    recording resumed, a rewind)."""

    def __init__(self, frames: int, fps: float, before: int, jump_s: float, start_s: float = 0.0) -> None:
        super().__init__(frames=frames, fps=fps)
        self._before = before
        self._jump_s = jump_s
        self._start_s = start_s

    def position_ms(self) -> float | None:
        position = super().position_ms()
        assert position is not None
        return position + 1000 * (self._start_s + (self._jump_s if self._read > self._before else 0.0))


def test_a_realtime_file_whose_timestamps_jump_far_ahead_goes_on_without_sleeping_through_the_gap() -> None:
    harness = ReaderHarness(file_stream(realtime=True), JumpingSource(frames=8, fps=20.0, before=3, jump_s=60.0))
    started = time.monotonic()
    harness.reader.start()
    try:
        assert harness.reader.finished.wait(5), "the reader slept through a 60 s jump in the timestamps"
    finally:
        harness.reader.stop()
    assert time.monotonic() - started >= 6 / 20.0 * 0.9, "still paced on both sides of the jump"
    assert [f.frame_id for f in harness.frames()] == list(range(8))


def test_a_realtime_file_whose_timestamps_jump_back_is_still_paced() -> None:
    rewinding = JumpingSource(frames=8, fps=20.0, before=2, jump_s=-600.0, start_s=600.0)
    harness = ReaderHarness(file_stream(realtime=True), rewinding)
    started = time.monotonic()
    harness.reader.start()
    assert harness.reader.finished.wait(5)
    assert time.monotonic() - started >= 6 / 20.0 * 0.9, "frames after the rewind were rushed out"


def test_a_realtime_file_pausing_between_frames_keeps_its_reader_heartbeat() -> None:
    harness = ReaderHarness(file_stream(realtime=True, stall_timeout_s=0.1),
                            JumpingSource(frames=3, fps=20.0, before=1, jump_s=3.0))
    harness.reader.start()
    try:
        while not harness.reader.finished.wait(0.05):
            assert harness.heartbeats.stuck(max_age_s=1.4) == [], "reported stuck while pacing a pause"
    finally:
        harness.reader.stop()
        assert harness.reader.join(2)
    assert len(harness.frames()) == 3


class SessionsSource(FakeSource):
    """Each open starts the next of `sessions`: None fails the open; a number is how many seconds the session
    gives frames (one every 10 ms, at least one) before the camera drops it. Records when it opened and
    dropped."""

    def __init__(self, sessions: Sequence[float | None]) -> None:
        super().__init__(frames=10**6)
        self._sessions = list(sessions)
        self._ends = 0.0
        self._given = 0
        self.opened_at: list[float] = []
        self.dropped_at: list[float] = []

    def open(self) -> bool:
        self.opened_at.append(time.monotonic())
        length = self._sessions.pop(0) if self._sessions else None
        if length is None:
            return False
        self._ends, self._given = time.monotonic() + length, 0
        return super().open()

    def read(self) -> npt.NDArray[np.uint8] | None:
        if self._given > 0 and time.monotonic() >= self._ends:
            self.dropped_at.append(time.monotonic())
            return None
        self._given += 1
        time.sleep(0.01)
        return super().read()


def test_a_camera_that_drops_after_each_frame_is_reconnected_with_a_growing_backoff() -> None:
    source = SessionsSource([0.0] * 100)
    harness = ReaderHarness(live_stream(reconnect_backoff_s=0.02, reconnect_backoff_max_s=5.0), source)
    started = time.monotonic()
    harness.reader.start()
    try:
        assert wait_until(lambda: harness.value("vap_stream_reconnects_total") >= 6)
    finally:
        harness.reader.stop()
        assert harness.reader.join(2)
    # Backoffs of at least 0.01, 0.02, 0.04, 0.08, 0.16 and 0.32 s; at the first step each time, about 0.1 s.
    assert time.monotonic() - started >= 0.6
    assert harness.value("vap_frames_read_total") >= 6


def test_a_session_healthy_for_a_stall_timeout_starts_the_backoff_again_from_its_first_step() -> None:
    source = SessionsSource([None, None, None, None, 0.5, 0.5])
    config = live_stream(reconnect_backoff_s=0.02, reconnect_backoff_max_s=5.0, stall_timeout_s=0.2)
    harness = ReaderHarness(config, source)
    harness.reader.start()
    try:
        assert wait_until(lambda: len(source.opened_at) >= 6)
    finally:
        harness.reader.stop()
        assert harness.reader.join(2)
    # After four failures the next backoff would be at least 0.16 s; from the first step it is at most 0.02 s.
    assert source.opened_at[5] - source.dropped_at[0] < 0.1
