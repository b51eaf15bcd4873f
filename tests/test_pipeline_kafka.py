"""End to end with real parts: video files -> the real model -> a real Kafka-protocol broker -> a consumer."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pipeline.app import Pipeline
from pipeline.cli import main
from pipeline.publishing.messages import load_schema
from pipeline.tools.broker import EmbeddedBroker, free_port
from pipeline.tools.cpu_account import KAFKA_PROCESS
from tests.conftest import (
    CLIP_FRAMES,
    ConfigFactory,
    closed_port_address,
    decode,
    http_call,
    metric_value,
    read_topic,
    run_to_completion,
    scrape,
    stop_with_sigterm,
    unused_topic,
    vap_process,
    wait_for,
    write_moving_box_clip,
)

DESIGN_METRICS = [
    "vap_frames_read_total", "vap_frames_dropped_total", "vap_frames_processed_total", "vap_stream_up",
    "vap_stream_reconnects_total", "vap_batch_size", "vap_inference_seconds", "vap_end_to_end_latency_seconds",
    "vap_queue_depth", "vap_kafka_messages_total", "vap_kafka_send_latency_seconds", "vap_detections_total",
    "vap_build_info",
]


def run_files_to_completion(config: Any) -> tuple[Pipeline, str]:
    """Run to the end of the files; also return /metrics as it was scraped once Kafka had every message, just
    before the pipeline stopped."""
    scraped: list[str] = []

    def scrape_metrics(pipeline: Pipeline) -> None:
        assert pipeline.http is not None and pipeline.publisher is not None
        publisher = pipeline.publisher
        wait_for(lambda: publisher.backlog() == 0, 30, "Kafka did not take every message")
        scraped.append(scrape(pipeline.http.port))

    return run_to_completion(config, before_stop=scrape_metrics), scraped[0]


@pytest.mark.parametrize("devices", ["cpu", ["cpu", "cpu"]], ids=["one-worker", "two-workers"])
def test_two_files_give_one_valid_ordered_message_per_processed_frame(
    broker: EmbeddedBroker, clips: dict[str, Path], make_config: ConfigFactory, devices: str | list[str]
) -> None:
    topic = unused_topic("frames")
    sizes = {"landscape": (320, 192), "portrait": (160, 256)}
    config = make_config(
        [{"id": f"cam-{name}", "url": str(path), "realtime": False} for name, path in clips.items()],
        broker.bootstrap_servers, topic, model={"device": devices},
    )
    pipeline, _ = run_files_to_completion(config)
    assert pipeline.processed == 2 * CLIP_FRAMES
    assert len(pipeline.workers) == (1 if isinstance(devices, str) else len(devices))

    records = read_topic(broker.bootstrap_servers, topic, expected=2 * CLIP_FRAMES, group=f"test-{topic}")
    assert len(records) == 2 * CLIP_FRAMES
    schema = load_schema()
    frame_ids: dict[str, list[int]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        message = decode(record)
        jsonschema.validate(message, schema)
        assert record.key.decode() == message["stream_id"]
        assert dict(record.headers) == {"content-type": b"application/json", "schema": b"vap.frame.v1"}
        width, height = sizes[message["stream_id"].removeprefix("cam-")]
        assert message["image"] == {"width": width, "height": height}
        frame_ids[message["stream_id"]].append(message["frame_id"])
    for stream_id, ids in frame_ids.items():
        assert ids == list(range(CLIP_FRAMES)), f"{stream_id} out of order or incomplete: {ids}"


def test_metrics_endpoint_serves_every_design_metric_with_real_values(
    broker: EmbeddedBroker, clips: dict[str, Path], make_config: ConfigFactory
) -> None:
    config = make_config(
        [{"id": "cam-a", "url": str(clips["landscape"]), "realtime": False}],
        broker.bootstrap_servers, unused_topic("metrics"),
    )
    _, metrics = run_files_to_completion(config)
    for name in DESIGN_METRICS:
        declared = (f"# TYPE {name} ", f"# TYPE {name.removesuffix('_total')} ")
        assert any(line in metrics for line in declared), f"{name} missing from /metrics"
    assert metric_value(metrics, "vap_frames_read_total", stream="cam-a") == CLIP_FRAMES
    assert metric_value(metrics, "vap_frames_processed_total", stream="cam-a") == CLIP_FRAMES
    assert (metric_value(metrics, "vap_batch_size_count", device="cpu") or 0) > 0
    assert (metric_value(metrics, "vap_inference_seconds_sum", device="cpu") or 0) > 0
    assert metric_value(metrics, "vap_end_to_end_latency_seconds_count", stream="cam-a") == CLIP_FRAMES
    assert metric_value(metrics, "vap_frames_dropped_total", stream="cam-a", reason="queue_full") == 0
    assert metric_value(metrics, "vap_build_info", device="cpu") == 1


@pytest.mark.parametrize("client_process", [True, False], ids=["client-in-child", "client-in-process"])
def test_every_frame_is_published_with_the_kafka_client_in_a_child_process_or_not_and_the_child_ends_with_vap(
    broker: EmbeddedBroker, clips: dict[str, Path], make_config: ConfigFactory, client_process: bool
) -> None:
    topic = unused_topic("client")
    config = make_config([{"id": "cam-a", "url": str(clips["landscape"]), "realtime": False}],
                         broker.bootstrap_servers, topic, kafka={"client_process": client_process})
    children: list[int] = []
    run_to_completion(config, before_stop=lambda pipeline: children.extend(pipeline.helper_pids[KAFKA_PROCESS]))
    if client_process:
        assert len(children) == 1 and children[0] != os.getpid()
        with pytest.raises(ProcessLookupError):
            os.kill(children[0], 0)  # gone, and reaped
    else:
        assert children == []
    records = read_topic(broker.bootstrap_servers, topic, expected=CLIP_FRAMES)
    assert sorted(decode(record)["frame_id"] for record in records) == list(range(CLIP_FRAMES))


def test_helpers_killed_mid_run_are_replaced_cost_no_frame_and_are_counted_on_metrics(
    broker: EmbeddedBroker, tmp_path: Path, make_config: ConfigFactory
) -> None:
    """The Kafka client's child and a message worker, SIGKILLed while frames flow: every frame still reaches the
    broker, and the scraped `/metrics` count one replacement of each kind and none of the others."""
    frames = 80
    clip = write_moving_box_clip(tmp_path / "clip.mp4", 320, 180, frames=frames)
    topic = unused_topic("helpers-killed")
    config = make_config([{"id": "cam-a", "url": str(clip), "realtime": False}], broker.bootstrap_servers, topic,
                         analytics={"message_processes": 1})
    pipeline = Pipeline(config)
    pipeline.start()
    try:
        assert pipeline.http is not None
        wait_for(lambda: pipeline.ledger.overall().published >= 5 and pipeline.helper_pids["message processes"], 30,
                 "frames should be published, their messages built by the worker")
        killed = pipeline.helper_pids[KAFKA_PROCESS] + pipeline.helper_pids["message processes"]
        assert len(killed) == 2
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        assert pipeline.wait(duration_s=60) == "all sources finished"
        wait_for(lambda: pipeline.ledger.overall().in_flight == 0, 30, "every frame should be settled")
        port = pipeline.http.port
        wait_for(lambda: metric_value(scrape(port), "vap_helper_replacements_total", kind="kafka_client") == 1, 30,
                 "the Kafka client's child should be replaced")
        metrics = scrape(port)
        status = http_call(port, "GET", "/api/v1/status")[1]
    finally:
        pipeline.stop()
    assert status["helper_replacements"] == {KAFKA_PROCESS: 1, "message processes": 1}
    assert metric_value(metrics, "vap_helper_replacements_total", kind="kafka_client") == 1
    assert metric_value(metrics, "vap_helper_replacements_total", kind="message") == 1
    assert metric_value(metrics, "vap_helper_replacements_total", kind="decoder") == 0
    assert metric_value(metrics, "vap_helper_processes", kind="kafka_client") == 1
    totals = pipeline.ledger.overall()
    assert totals.read == totals.published == frames
    delivered = {decode(record)["frame_id"] for record in read_topic(broker.bootstrap_servers, topic, frames)}
    assert delivered == set(range(frames)), "messages in flight at the kill are resent"


def test_health_and_readiness_probes_answer_over_http(
    broker: EmbeddedBroker, clips: dict[str, Path], make_config: ConfigFactory
) -> None:
    config = make_config(
        [{"id": "cam-a", "url": str(clips["landscape"]), "loop": True}], broker.bootstrap_servers, unused_topic("h")
    )
    pipeline = Pipeline(config)
    pipeline.start()
    try:
        assert pipeline.http is not None
        base = f"http://127.0.0.1:{pipeline.http.port}"
        with urllib.request.urlopen(base + "/healthz", timeout=5) as response:
            assert response.status == 200
        with urllib.request.urlopen(base + "/readyz", timeout=5) as response:
            body = json.loads(response.read())
        assert body["ready"] is True
        assert set(body["streams"]) == {"cam-a"}
        assert body["streams"]["cam-a"]["state"] in {"connecting", "up"}
    finally:
        pipeline.stop()


def test_consume_command_prints_published_messages_as_json(
    broker: EmbeddedBroker, clips: dict[str, Path], make_config: ConfigFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    topic = unused_topic("consume")
    config = make_config(
        [{"id": "cam-a", "url": str(clips["landscape"]), "realtime": False},
         {"id": "cam-b", "url": str(clips["portrait"]), "realtime": False}],
        broker.bootstrap_servers, topic,
    )
    run_files_to_completion(config)
    capsys.readouterr()
    code = main(["consume", "--bootstrap", broker.bootstrap_servers, "--topic", topic, "--from-beginning",
                 "--format", "json", "--stream", "cam-b", "--idle-timeout", "3"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == CLIP_FRAMES
    assert {json.loads(line)["stream_id"] for line in lines} == {"cam-b"}


def test_schema_command_prints_the_shipped_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == load_schema()


def test_unreachable_broker_keeps_inferring_counts_failures_and_stops_on_sigterm(
    tmp_path: Path, clips: dict[str, Path], model_weights: str
) -> None:
    port = free_port()
    config = {
        "streams": [{"id": "cam-a", "url": str(clips["landscape"]), "loop": True}],
        "model": {"weights": model_weights, "imgsz": 160},
        "batching": {"max_batch": 2},
        "kafka": {"bootstrap_servers": closed_port_address(), "spool": {"max_messages": 5}},
        "http": {"host": "127.0.0.1", "port": port},
    }
    path = tmp_path / "unreachable.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with vap_process(["run", "-c", str(path)], env={**os.environ, "PYTHONUNBUFFERED": "1"}) as process:
        deadline = time.monotonic() + 90
        metrics = ""
        while time.monotonic() < deadline:
            try:
                metrics = scrape(port)
            except OSError:
                metrics = ""
            failed = metric_value(metrics, "vap_kafka_messages_total", result="failed") or 0
            dropped = metric_value(metrics, "vap_kafka_messages_total", result="dropped") or 0
            if failed > 0 and dropped > 0:
                break
            assert process.poll() is None, "the pipeline exited while the broker was unreachable"
            time.sleep(0.25)
        assert (metric_value(metrics, "vap_stage_seconds_count", stage="infer") or 0) > 2, "inference goes on"
        assert metric_value(metrics, "vap_frames_processed_total", stream="cam-a") == 0, "nothing was published"
        assert (metric_value(metrics, "vap_frames_dropped_total", stream="cam-a", reason="spool_full") or 0) > 0, \
            "frames whose messages the spool's bound pushed out are counted as the stream's drops"
        assert (metric_value(metrics, "vap_kafka_messages_total", result="failed") or 0) > 0
        assert (metric_value(metrics, "vap_kafka_messages_total", result="dropped") or 0) > 0
        assert metric_value(metrics, "vap_kafka_messages_total", result="sent") == 0
        stop_with_sigterm(process)


def test_when_the_kafka_client_process_cannot_start_here_results_go_out_through_this_process(
    broker: EmbeddedBroker, clips: dict[str, Path], make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.publishing.kafka_process

    monkeypatch.setattr(pipeline.publishing.kafka_process, "_CHILD_BOOTSTRAP", "import sys; sys.exit(3)")
    topic = unused_topic("no-child")
    config = make_config([{"id": "cam-a", "url": str(clips["landscape"]), "realtime": False}],
                         broker.bootstrap_servers, topic)
    run_to_completion(config)
    records = read_topic(broker.bootstrap_servers, topic, expected=CLIP_FRAMES)
    assert sorted(decode(record)["frame_id"] for record in records) == list(range(CLIP_FRAMES))


def test_readiness_turns_503_as_soon_as_results_are_dropped_after_the_broker_dies(
    clips: dict[str, Path], make_config: ConfigFactory
) -> None:
    with EmbeddedBroker() as broker:
        config = make_config([{"id": "cam-a", "url": str(clips["landscape"]), "loop": True}],
                             broker.bootstrap_servers, unused_topic("ready"), kafka={"spool": {"max_messages": 5}})
        pipeline = Pipeline(config)
        pipeline.start()
        try:
            assert pipeline.http is not None
            port = pipeline.http.port
            wait_for(lambda: (metric_value(scrape(port), "vap_kafka_messages_total", result="sent") or 0) > 0, 30,
                     "no message was acknowledged")
            # A busy machine can fill a spool of 5 while the producer starts; vap is unready for 5 s after that.
            wait_for(lambda: readyz(port)[0] == 200, 20, "vap should be ready with the broker taking every message")

            def dropped() -> float:
                return metric_value(scrape(port), "vap_kafka_messages_total", result="dropped") or 0

            before = dropped()
            broker.stop()
            wait_for(lambda: dropped() > before, 30, "no message was dropped with the broker gone and a spool of 5")
            status, body = readyz(port)
            assert status == 503 and body["kafka"]["dropping"] is True, body
            wait_for(lambda: readyz(port)[1]["kafka"]["connected"] is False, 10,
                     "the broker was still reported connected long after it died")
        finally:
            pipeline.stop()


def readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
