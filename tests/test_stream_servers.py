"""The stream servers the reader tests rely on, read the way the pipeline reads them: OpenCV's FFmpeg backend."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest

from tests.servers.fixtures import (
    Image,
    MjpegServerFactory,
    RtspServer,
    RtspServerError,
    RtspServerFactory,
    box_x,
    rtsp_unavailable_reason,
    write_sample_clip,
)

pytestmark = pytest.mark.timeout(60)

SHORT_CLIP_FRAMES = 10


@pytest.fixture(autouse=True)
def _rtsp_over_tcp(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp")
    yield


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One second: 10 frames at 10 fps, so a few seconds of reading go round the loop several times."""
    return write_sample_clip(tmp_path_factory.mktemp("short") / "short.mp4", frames=SHORT_CLIP_FRAMES)


def open_capture(url: str, read_timeout_ms: int = 2000, open_timeout_ms: int = 10000) -> cv2.VideoCapture:
    timeouts = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, open_timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, read_timeout_ms]
    return cv2.VideoCapture(url, cv2.CAP_FFMPEG, timeouts)


def read_frames(capture: cv2.VideoCapture, count: int) -> list[Image]:
    frames: list[Image] = []
    for _ in range(count):
        ok, image = capture.read()
        assert ok and image is not None, f"read failed after {len(frames)} frames"
        frames.append(image)
    return frames


def seconds_until_read_fails(capture: cv2.VideoCapture, limit_s: float = 10.0) -> float:
    """Read until a read fails (frames already buffered come out first); the seconds that took."""
    began = time.monotonic()
    while time.monotonic() - began < limit_s:
        ok, _ = capture.read()
        if not ok:
            return time.monotonic() - began
    raise AssertionError(f"reads still succeed {limit_s:g} s after the server went away")


def wraps(frames: list[Image]) -> int:
    """How often the moving box jumps back to the left edge: how often the clip started again."""
    positions = [x for x in (box_x(image) for image in frames) if x is not None]
    assert len(positions) >= len(frames) - 1, "the moving box is missing from the decoded frames"
    return sum(1 for before, after in itertools.pairwise(positions) if after < before - 100)


# ---------------------------------------------------------------------------------------------- RTSP


def test_rtsp_server_serves_the_clip_in_a_loop(rtsp_server_factory: RtspServerFactory, short_clip: Path) -> None:
    server = rtsp_server_factory(short_clip)
    assert server.url == f"rtsp://127.0.0.1:{server.port}/stream"
    capture = open_capture(server.url)
    try:
        assert capture.isOpened()
        frames = read_frames(capture, 3 * SHORT_CLIP_FRAMES)
    finally:
        capture.release()
    assert {image.shape for image in frames} == {(240, 320, 3)}
    assert wraps(frames) >= 2


def test_rtsp_reader_fails_after_stop_and_reads_again_after_restart(
    rtsp_server_factory: RtspServerFactory, short_clip: Path
) -> None:
    server = rtsp_server_factory(short_clip)
    port = server.port
    capture = open_capture(server.url, read_timeout_ms=2000)
    try:
        assert capture.isOpened()
        read_frames(capture, 3)
        server.stop()
        assert not server.running
        assert seconds_until_read_fails(capture) < 5.0
    finally:
        capture.release()

    refused = open_capture(server.url, open_timeout_ms=3000)
    assert not refused.isOpened(), "a stopped server still accepted a reader"
    refused.release()

    server.restart()
    assert server.port == port
    assert server.start_seconds is not None and server.start_seconds < 15.0
    again = open_capture(server.url)
    try:
        assert again.isOpened()
        assert {image.shape for image in read_frames(again, 5)} == {(240, 320, 3)}
    finally:
        again.release()


def test_rtsp_server_reports_a_clip_it_cannot_play(tmp_path: Path) -> None:
    reason = rtsp_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"this is not a video")
    server = RtspServer(broken, start_timeout_s=20.0)
    with pytest.raises(RtspServerError, match=r"broken\.mp4.*exited before it was ready.*stderr") as raised:
        server.start()
    assert "cannot decode" in str(raised.value)
    assert not server.running


# ---------------------------------------------------------------------------------------------- MJPEG


def test_mjpeg_server_serves_the_frames_of_a_clip(mjpeg_server_factory: MjpegServerFactory,
                                                   stream_clip: Path) -> None:
    server = mjpeg_server_factory(clip=stream_clip, fps=30.0)
    assert server.url == f"http://127.0.0.1:{server.port}/stream.mjpg"
    capture = open_capture(server.url)
    try:
        assert capture.isOpened()
        frames = read_frames(capture, 35)
    finally:
        capture.release()
    assert {image.shape for image in frames} == {(240, 320, 3)}
    assert wraps(frames) == 1  # 30 frames in the clip, every client starts at the first


def test_mjpeg_reader_fails_after_an_abrupt_stop_and_reads_again_after_restart(
    mjpeg_server_factory: MjpegServerFactory,
) -> None:
    server = mjpeg_server_factory(size=(160, 128), fps=20.0)
    port = server.port
    capture = open_capture(server.url)
    try:
        assert capture.isOpened()
        assert {image.shape for image in read_frames(capture, 5)} == {(128, 160, 3)}
        server.stop(abrupt=True)
        assert seconds_until_read_fails(capture) < 5.0
    finally:
        capture.release()

    server.restart()
    assert server.port == port
    again = open_capture(server.url)
    try:
        assert again.isOpened()
        read_frames(again, 3)
    finally:
        again.release()
    assert server.connections == 2


def test_mjpeg_server_cuts_clients_off_and_keeps_listening(mjpeg_server_factory: MjpegServerFactory) -> None:
    server = mjpeg_server_factory(fps=50.0, frames_per_connection=10)
    capture = open_capture(server.url)
    try:
        assert capture.isOpened()
        read = 0
        while read < 50 and capture.read()[0]:
            read += 1
        assert 5 <= read <= 11  # the cut frame may still decode, damaged
    finally:
        capture.release()

    server.frames_per_connection = None
    capture = open_capture(server.url)
    try:
        read_frames(capture, 3)
        server.drop_clients()
        assert seconds_until_read_fails(capture) < 5.0
    finally:
        capture.release()
    assert server.running
