"""Decoding in worker processes (`decoding.processes`): the same frames, the same detections, and a worker
that dies costs a reconnect, never the stream."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import StreamConfig
from pipeline.sources.decoder_pool import DecoderPool, ProcessSource
from pipeline.sources.opencv import OpenCvSource
from pipeline.tools.broker import EmbeddedBroker
from tests.conftest import (
    CLIP_FRAMES,
    ConfigFactory,
    assert_same_detections,
    publish_clips,
)


@pytest.fixture
def pool() -> Iterator[DecoderPool]:
    made = DecoderPool(2)
    yield made
    made.close()


def test_a_worker_process_gives_the_frames_and_positions_the_reader_thread_would(
        pool: DecoderPool, clips: dict[str, Path]) -> None:
    config = StreamConfig(id="cam", url=str(clips["landscape"]))
    remote, local = pool.source_factory(1)(config), OpenCvSource(config)
    assert remote.open() and local.open()
    assert remote.frame_rate() == local.frame_rate() == 10.0
    frames = 0
    try:
        while (image := remote.read()) is not None:
            expected = local.read()
            assert expected is not None and np.array_equal(image, expected)
            assert remote.position_ms() == local.position_ms()
            frames += 1
        assert local.read() is None
    finally:
        remote.close()
        local.close()
    assert frames == CLIP_FRAMES


def test_a_worker_that_dies_ends_its_streams_reads_and_the_next_open_gets_a_new_worker(
        pool: DecoderPool, clips: dict[str, Path]) -> None:
    config = StreamConfig(id="cam", url=str(clips["landscape"]))
    source = pool.source_factory(1)(config)
    assert isinstance(source, ProcessSource) and source.open()
    assert source.read() is not None
    worker = source._worker
    assert worker is not None
    os.kill(worker.pid, signal.SIGKILL)
    started = time.monotonic()
    while source.read() is not None:  # what was decoded ahead may still come; then the stream ends
        assert time.monotonic() - started < 5
    source.close()
    assert pool.replacements == 0
    again = pool.source_factory(1)(config)
    assert again.open() and again.read() is not None
    assert again._worker is not None and again._worker.pid != worker.pid  # type: ignore[attr-defined]
    assert pool.replacements == 1
    again.close()


def test_frames_reach_the_reader_with_no_thread_of_the_pool_between_and_a_closed_session_frees_its_memory(
        pool: DecoderPool, clips: dict[str, Path]) -> None:
    threads_before = {thread.ident for thread in threading.enumerate()}
    source = pool.source_factory(1)(StreamConfig(id="cam", url=str(clips["landscape"])))
    assert isinstance(source, ProcessSource) and source.open()
    for _ in range(3):
        assert source.read() is not None
    assert {thread.ident for thread in threading.enumerate()} <= threads_before
    assert source._memory is not None
    memory = Path("/dev/shm") / source._memory.name.lstrip("/")
    assert memory.exists()
    source.close()  # mid-stream: the worker's decoder sees its session end and removes the frames' memory
    started = time.monotonic()
    while memory.exists():
        assert time.monotonic() - started < 5, "the worker kept the memory of a closed session"
        time.sleep(0.02)


def test_closing_the_pool_under_open_streams_stops_its_workers_and_removes_their_memory(
        clips: dict[str, Path]) -> None:
    pool = DecoderPool(1)
    sources = [pool.source_factory(1)(StreamConfig(id=name, url=str(path))) for name, path in clips.items()]
    memories = []
    for source in sources:
        assert isinstance(source, ProcessSource) and source.open() and source.read() is not None
        assert source._memory is not None
        memories.append(Path("/dev/shm") / source._memory.name.lstrip("/"))
    assert len(pool.pids) == 1
    started = time.monotonic()
    pool.close(timeout_s=2.0)
    assert time.monotonic() - started < 2.5 and not pool.pids
    assert not [memory for memory in memories if memory.exists()]
    for source in sources:
        decoded_ahead = 0
        while source.read() is not None:
            decoded_ahead += 1
            assert decoded_ahead <= 2, "a stopped worker's stream gave more than the frames it had decoded ahead"
        source.close()


def test_a_file_that_cannot_be_opened_is_refused_by_the_worker(pool: DecoderPool, tmp_path: Path) -> None:
    source = pool.source_factory(1)(StreamConfig(id="cam", url=str(tmp_path / "missing.mp4")))
    assert not source.open()
    source.close()


def test_decoder_processes_give_the_detections_of_the_in_process_path_and_account_for_every_frame(
        broker: EmbeddedBroker, clips: dict[str, Path], make_config: ConfigFactory) -> None:
    results = {}
    for processes in (0, 2):
        pipeline, results[processes] = publish_clips(broker, clips, make_config, f"decoders-{processes}",
                                                     decoding={"processes": processes})
        if processes:
            assert pipeline._decoders is not None and not pipeline._decoders.pids, "workers stop with vap"
    assert_same_detections(results[2], results[0], 2 * CLIP_FRAMES)
