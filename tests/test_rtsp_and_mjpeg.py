"""Readers against real stream servers: an RTSP camera that dies and comes back, and an MJPEG camera."""

from __future__ import annotations

import itertools
import os
import time
from datetime import datetime
from pathlib import Path

import pytest

from pipeline.app import Pipeline
from pipeline.tools.broker import EmbeddedBroker
from tests.conftest import ConfigFactory, decode, read_topic, sample, unused_topic, wait_for
from tests.servers.fixtures import MjpegServerFactory, RtspServerFactory


def test_rtsp_camera_killed_mid_stream_goes_down_comes_back_and_other_streams_never_pause(
    broker: EmbeddedBroker, stream_clip: Path, clips: dict[str, Path], make_config: ConfigFactory,
    rtsp_server_factory: RtspServerFactory,
) -> None:
    server = rtsp_server_factory(stream_clip)
    topic = unused_topic("rtsp")
    stall_timeout_s, backoff_max_s = 2.0, 1.0
    config = make_config(
        [
            {"id": "camera", "url": server.url, "stall_timeout_s": stall_timeout_s, "reconnect_backoff_s": 0.2,
             "reconnect_backoff_max_s": backoff_max_s},
            {"id": "file", "url": str(clips["landscape"]), "loop": True},
        ],
        broker.bootstrap_servers, topic, model={"warmup": True},
    )
    pipeline = Pipeline(config)
    pipeline.start()
    try:
        wait_for(lambda: sample(pipeline, "vap_frames_processed_total", stream="camera") >= 5, 30, "no RTSP frames")
        assert sample(pipeline, "vap_stream_up", stream="camera") == 1
        server.kill()
        went_down_after = wait_for(lambda: sample(pipeline, "vap_stream_up", stream="camera") == 0,
                                   stall_timeout_s + backoff_max_s + 5, "the dead camera still shows up=1")
        assert went_down_after <= stall_timeout_s + backoff_max_s + 5
        read_while_down = sample(pipeline, "vap_frames_read_total", stream="camera")  # frames in flight publish later
        time.sleep(2)
        server.restart()
        wait_for(lambda: sample(pipeline, "vap_frames_read_total", stream="camera") >= read_while_down + 5,
                 30, "the camera did not come back by itself")
        assert sample(pipeline, "vap_stream_up", stream="camera") == 1
        assert sample(pipeline, "vap_stream_reconnects_total", stream="camera") >= 1
    finally:
        pipeline.stop()
    records = read_topic(broker.bootstrap_servers, topic, expected=pipeline.processed)
    messages = [decode(record) for record in records]
    camera_ids = [m["frame_id"] for m in messages if m["stream_id"] == "camera"]
    assert camera_ids == sorted(camera_ids) and len(set(camera_ids)) == len(camera_ids)
    file_times = sorted(datetime.fromisoformat(m["captured_at"]) for m in messages if m["stream_id"] == "file")
    gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(file_times)]
    assert max(gaps) < 1.0, f"the file stream paused for {max(gaps):.2f} s while the camera was down"
    assert {m["image"]["width"] for m in messages if m["stream_id"] == "camera"} == {320}


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_rtsp_camera_is_read_over_both_transports(
    broker: EmbeddedBroker, stream_clip: Path, make_config: ConfigFactory, rtsp_server_factory: RtspServerFactory,
    transport: str,
) -> None:
    server = rtsp_server_factory(stream_clip)
    config = make_config([{"id": "camera", "url": server.url, "transport": transport}], broker.bootstrap_servers,
                         unused_topic(f"rtsp-{transport}"))
    pipeline = Pipeline(config)
    pipeline.start()
    try:
        wait_for(lambda: sample(pipeline, "vap_frames_processed_total", stream="camera") >= 5, 30,
                 f"no frames over RTSP/{transport}")
    finally:
        pipeline.stop()


def test_tcp_and_udp_cameras_connect_side_by_side_without_touching_the_environment(
    broker: EmbeddedBroker, stream_clip: Path, make_config: ConfigFactory, rtsp_server_factory: RtspServerFactory,
) -> None:
    """Each RTSP open carries its own FFmpeg options (PyAV), so cameras with different transports connect in
    parallel, and nothing writes the process environment native threads may be reading."""
    server = rtsp_server_factory(stream_clip)
    config = make_config([{"id": "tcp", "url": server.url, "transport": "tcp"},
                          {"id": "udp", "url": server.url, "transport": "udp"}], broker.bootstrap_servers,
                         unused_topic("rtsp-both"))
    environment = dict(os.environ)
    pipeline = Pipeline(config)
    pipeline.start()
    try:
        wait_for(lambda: min(sample(pipeline, "vap_frames_processed_total", stream=stream_id)
                             for stream_id in ("tcp", "udp")) >= 5, 30, "no frames from one of the cameras")
        assert dict(os.environ) == environment
    finally:
        pipeline.stop()


def test_mjpeg_camera_is_read_and_reconnects_after_it_drops(
    broker: EmbeddedBroker, make_config: ConfigFactory, mjpeg_server_factory: MjpegServerFactory
) -> None:
    server = mjpeg_server_factory(fps=10, size=(256, 160))
    topic = unused_topic("mjpeg")
    config = make_config(
        [{"id": "mjpeg", "url": server.url, "stall_timeout_s": 2, "reconnect_backoff_s": 0.2,
          "reconnect_backoff_max_s": 1}],
        broker.bootstrap_servers, topic,
    )
    pipeline = Pipeline(config)
    pipeline.start()
    try:
        wait_for(lambda: sample(pipeline, "vap_frames_processed_total", stream="mjpeg") >= 5, 30, "no MJPEG frames")
        server.drop_clients()
        before = sample(pipeline, "vap_frames_read_total", stream="mjpeg")
        wait_for(lambda: sample(pipeline, "vap_frames_read_total", stream="mjpeg") >= before + 5, 30,
                 "MJPEG did not come back after the server dropped its clients")
    finally:
        pipeline.stop()
    records = read_topic(broker.bootstrap_servers, topic, expected=5)
    assert decode(records[0])["image"] == {"width": 256, "height": 160}

