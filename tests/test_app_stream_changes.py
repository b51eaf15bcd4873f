"""Stream changes at run time against a pipeline with a fake model and a fake Kafka producer: what a refused
stream leaves behind, when changes are accepted, what listing streams costs, and which stream a result that
was in flight while its stream was restarted belongs to."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from prometheus_client import Metric

from pipeline.app import Pipeline, StopTimeouts
from pipeline.config import PipelineConfig, StreamConfig
from pipeline.inference.detector import Detector
from pipeline.ops.metrics import DROP_REASONS
from tests.conftest import sample, scrape, wait_for, wait_until, write_moving_box_clip
from tests.fakes import FakeProducer, InstantDetector, config_with, fake_kafka
from tests.test_control_api import call

READ = "vap_frames_read_total"
PROCESSED = "vap_frames_processed_total"
NO_CAMERA = "rtsp://127.0.0.1:1/live"  # nothing listens: the reader backs off and reads nothing


def started(pipelines: list[Pipeline], config: PipelineConfig,
            detector_factory: Callable[[PipelineConfig, str], Detector] | None = None,
            producers: list[FakeProducer] | None = None) -> Pipeline:
    detector = InstantDetector()
    pipeline = Pipeline(config, detector_factory=detector_factory or (lambda _config, _device: detector),
                        producer_factory=fake_kafka(producers))
    pipelines.append(pipeline)
    pipeline.start()
    return pipeline


def port_of(pipeline: Pipeline) -> int:
    assert pipeline.http is not None
    return pipeline.http.port


def test_a_stream_refused_for_its_analytics_leaves_no_buffer_series_or_id_behind(pipelines: list[Pipeline]) -> None:
    pipeline = started(pipelines, config_with([{"id": "steady", "url": NO_CAMERA}]))
    port = port_of(pipeline)
    gate = {"id": "gate", "url": NO_CAMERA, "analytics": {
        "zones": [{"id": "dock", "polygon": [[0, 0], [1, 0], [1, 1]], "classes": ["forklift"]}]}}
    code, body = call(port, "POST", "/api/v1/streams", gate, token=None)
    assert code == 422 and "forklift" in body["detail"]
    assert pipeline.hub.slot("gate") is None
    assert 'stream="gate"' not in scrape(port), "a refused stream must not export vap_stream_up 0 for ever"
    assert [entry["id"] for entry in call(port, "GET", "/api/v1/streams")[1]] == ["steady"]
    assert call(port, "DELETE", "/api/v1/streams/gate", token=None)[0] == 404
    assert call(port, "POST", "/api/v1/streams", {"id": "gate", "url": NO_CAMERA}, token=None)[0] == 201
    assert pipeline.hub.slot("gate") is not None


def test_stream_changes_answer_503_while_the_model_loads_and_again_once_stopping_while_reads_go_on(
    pipelines: list[Pipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = threading.Event()

    def slow_model(_config: PipelineConfig, _device: str) -> Detector:
        loaded.wait(30)
        return InstantDetector()

    pipeline = Pipeline(config_with([{"id": "steady", "url": NO_CAMERA}]), detector_factory=slow_model,
                        producer_factory=fake_kafka())
    pipelines.append(pipeline)
    start_errors: list[BaseException] = []

    def start() -> None:
        try:
            pipeline.start()
        except BaseException as error:
            start_errors.append(error)

    starting = threading.Thread(target=start)
    starting.start()
    try:
        wait_for(lambda: pipeline.http is not None and call(port_of(pipeline), "GET", "/healthz")[0] == 200, 10,
                 "HTTP did not answer during the model's loading", ignore=(OSError,))
        port = port_of(pipeline)
        for method, path, body in (
            ("POST", "/api/v1/streams", {"id": "steady", "url": NO_CAMERA}),
            ("POST", "/api/v1/streams", {"id": "tracked", "url": NO_CAMERA, "analytics": {"tracking": True}}),
            ("DELETE", "/api/v1/streams/steady", None),
        ):
            code, answer = call(port, method, path, body, token=None)
            assert (code, answer["detail"]) == (503, "starting; stream changes are accepted once ready"), path
        assert call(port, "GET", "/api/v1/streams")[0] == 200
        assert call(port, "GET", "/api/v1/status")[1]["ready"] is False
        assert call(port, "GET", "/readyz")[0] == 503
    finally:
        loaded.set()
        starting.join(30)
    assert not start_errors, "a change refused during the start must not make the start fail"
    assert set(pipeline.readers) == {"steady"}
    assert call(port, "POST", "/api/v1/streams", {"id": "added", "url": NO_CAMERA}, token=None)[0] == 201

    stop_may_go_on = threading.Event()
    monkeypatch.setattr(pipeline.readers["steady"], "join", lambda _timeout: stop_may_go_on.wait(30))
    stopping = threading.Thread(target=pipeline.stop)
    stopping.start()
    try:
        wait_for(lambda: call(port, "DELETE", "/api/v1/streams/added", token=None)[0] == 503, 10,
                 "a removal was accepted after stop began")
        code, answer = call(port, "POST", "/api/v1/streams", {"id": "late", "url": NO_CAMERA}, token=None)
        assert (code, answer["detail"]) == (503, "stopping; stream changes are no longer accepted")
        assert call(port, "GET", "/api/v1/streams")[0] == 200
        assert "late" not in pipeline.readers
    finally:
        stop_may_go_on.set()
        stopping.join(30)


def test_listing_streams_gives_each_streams_counts_without_collecting_the_whole_registry(
    clips: dict[str, Path], pipelines: list[Pipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = started(pipelines, config_with([
        {"id": "full", "url": str(clips["landscape"])},
        {"id": "capped", "url": str(clips["portrait"]), "fps": 5},
    ]))
    port = port_of(pipeline)
    wait_for(lambda: all(reader.finished.is_set() for reader in pipeline.readers.values())
             and pipeline.hub.drained() and pipeline.publisher is not None and pipeline.publisher.backlog() == 0
             and sample(pipeline, PROCESSED, stream="full") == sample(pipeline, READ, stream="full"), 30,
             "the clips were not processed")
    expected = {stream: (sample(pipeline, READ, stream=stream), sample(pipeline, PROCESSED, stream=stream))
                for stream in ("full", "capped")}
    assert expected["full"][1] > expected["capped"][1] > 0
    collections: list[None] = []
    collect = pipeline.registry.collect

    def counted_collect() -> Iterable[Metric]:
        collections.append(None)
        return collect()

    monkeypatch.setattr(pipeline.registry, "collect", counted_collect)
    code, listed = call(port, "GET", "/api/v1/streams")
    assert code == 200
    assert {entry["id"]: (entry["frames_read"], entry["frames_processed"]) for entry in listed} == expected
    code, readiness = call(port, "GET", "/readyz")
    assert code == 200 and set(readiness["streams"]) == {"full", "capped"}
    assert not collections, "each stream's counts were read by collecting the registry"


def test_results_in_flight_when_a_stream_is_restarted_are_published_but_not_counted_for_the_new_stream(
    clips: dict[str, Path], pipelines: list[Pipeline]
) -> None:
    release = threading.Event()
    detector = InstantDetector(release)
    producers: list[FakeProducer] = []
    pipeline = started(pipelines, config_with([{"id": "cam", "url": str(clips["landscape"])}]),
                       detector_factory=lambda _config, _device: detector, producers=producers)
    try:
        wait_for(detector.holding.is_set, 10, "no batch of the first stream reached the model")
        pipeline.remove_stream("cam")
        pipeline.add_stream(StreamConfig.model_validate({"id": "cam", "url": str(clips["portrait"])}))
    finally:
        release.set()
    reader = pipeline.readers["cam"]
    wait_for(lambda: reader.finished.is_set() and pipeline.hub.drained(), 30, "the new stream did not finish")
    wait_for(lambda: sample(pipeline, PROCESSED, stream="cam") >= sample(pipeline, READ, stream="cam"), 10,
             "the new stream's frames were not all published")
    assert sample(pipeline, PROCESSED, stream="cam") == sample(pipeline, READ, stream="cam") > 0, (
        "frames read before the restart were counted as the new stream's")

    def published() -> int:
        return sum(key == b"cam" for producer in producers for key, _value in producer.sent)

    expected = detector.held + sample(pipeline, READ, stream="cam")
    wait_for(lambda: published() >= expected, 10, "the results held while the stream restarted were lost")


def test_frames_a_stop_leaves_behind_are_counted_as_dropped_so_read_equals_processed_plus_dropped(
    pipelines: list[Pipeline], tmp_path: Path
) -> None:
    """The model holds its first batch, so the file's reader fills its buffer and blocks; a stop whose drain
    deadline passes must count the waiting frames and the one the reader could not hand over."""
    release = threading.Event()
    detector = InstantDetector(release)
    config = config_with([{"id": "file", "url": str(write_moving_box_clip(tmp_path / "long.mp4", 96, 64, frames=60)),
                           "realtime": False}])
    pipeline = Pipeline(config, detector_factory=lambda _config, _device: detector, producer_factory=fake_kafka(),
                        timeouts=StopTimeouts(drain_s=0.5, workers_s=5.0, kafka_flush_s=1.0))
    pipelines.append(pipeline)
    pipeline.start()
    wait_for(lambda: detector.holding.is_set() and pipeline.hub.depth() == 4, 10, "the buffer never filled")
    in_flight = pipeline.hub.in_flight()

    def release_once_the_drain_deadline_passed() -> None:  # the waiting frames are dropped then; workers are joined
        wait_until(lambda: sample(pipeline, "vap_frames_dropped_total", stream="file", reason="shutdown") >= 4)
        release.set()

    threading.Thread(target=release_once_the_drain_deadline_passed, daemon=True).start()
    pipeline.stop()
    read, processed = sample(pipeline, READ, stream="file"), sample(pipeline, PROCESSED, stream="file")
    shutdown = sample(pipeline, "vap_frames_dropped_total", stream="file", reason="shutdown")
    dropped = sum(sample(pipeline, "vap_frames_dropped_total", stream="file", reason=reason)
                  for reason in DROP_REASONS)
    assert processed == in_flight > 0, "the batches the model already had finish within the stop"
    assert shutdown == 5, "4 frames waiting in the buffer and 1 refused to the blocked reader"
    assert read == processed + dropped


def test_frames_a_stuck_model_holds_at_stop_are_counted_as_dropped_and_not_published_late(
    pipelines: list[Pipeline], tmp_path: Path
) -> None:
    """The model never returns its batch within the stop: its frames must still be counted, once."""
    release = threading.Event()
    detector = InstantDetector(release)
    producers: list[FakeProducer] = []
    config = config_with([{"id": "file", "url": str(write_moving_box_clip(tmp_path / "long.mp4", 96, 64, frames=60)),
                           "realtime": False}])
    pipeline = Pipeline(config, detector_factory=lambda _config, _device: detector,
                        producer_factory=fake_kafka(producers), timeouts=StopTimeouts(drain_s=0.5, kafka_flush_s=1.0))
    pipelines.append(pipeline)
    pipeline.start()
    try:
        wait_for(lambda: detector.holding.is_set() and pipeline.hub.depth() == 4, 10, "the buffer never filled")
        held = pipeline.hub.in_flight()
        pipeline.stop()
        assert any(worker.is_alive() for worker in pipeline.workers), "the model was to hold its batch past the stop"
    finally:
        release.set()
    wait_for(lambda: not any(worker.is_alive() for worker in pipeline.workers), 10, "the worker never ended")
    read, processed = sample(pipeline, READ, stream="file"), sample(pipeline, PROCESSED, stream="file")
    shutdown = sample(pipeline, "vap_frames_dropped_total", stream="file", reason="shutdown")
    dropped = sum(sample(pipeline, "vap_frames_dropped_total", stream="file", reason=reason)
                  for reason in DROP_REASONS)
    assert processed == 0 and held > 0
    assert shutdown == held + 5, "the held batch, 4 frames waiting in the buffer and 1 refused to the reader"
    assert read == processed + dropped
    assert not any(key == b"file" for producer in producers for key, _value in producer.sent)
