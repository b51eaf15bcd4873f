"""The command line when things go wrong: one clear line, the documented exit code, and nothing left running."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

import pipeline.app
from pipeline.cli import main, run_pipeline
from pipeline.config import PipelineConfig, load_config
from pipeline.tools.broker import EmbeddedBroker
from pipeline.tools.consume import ConsumeOptions, consume
from tests.conftest import closed_port_address, http_call, unused_topic, vap_process, wait_for


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def config_file(tmp_path: Path, extra: str = "") -> Path:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not read: the run stops before any stream opens")
    path = tmp_path / "config.yaml"
    path.write_text(f"streams:\n  - {{id: a, url: {clip}}}\nhttp: {{host: 127.0.0.1}}\n{extra}", encoding="utf-8")
    return path


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout_s: float = 120) -> tuple[int, str, str]:
    with vap_process(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as process:
        out, err = process.communicate(timeout=timeout_s)
    return process.returncode, out.decode(), err.decode()


def test_run_that_cannot_listen_exits_1_with_one_error_line_and_no_traceback(tmp_path: Path, taken_port: int) -> None:
    code, _, err = run_cli(["run", "-c", str(config_file(tmp_path)), "--set", f"http.port={taken_port}"])
    assert code == 1, err
    assert "Traceback" not in err and "cannot join thread" not in err, err
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"cannot listen on 127.0.0.1:{taken_port}" in errors[0], err


def test_run_on_an_address_this_machine_does_not_have_names_http_host(tmp_path: Path) -> None:
    code, _, err = run_cli(["run", "-c", str(config_file(tmp_path)), "--set", "http.host=192.0.2.1"])
    assert code == 1, err
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "cannot listen on 192.0.2.1:9108 (http.host: no interface" in errors[0], err


def test_run_whose_only_file_cannot_be_read_exits_1_with_one_error_line(tmp_path: Path, model_weights: str) -> None:
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_bytes(b"this is not a video")
    path = tmp_path / "config.yaml"
    path.write_text(
        f"streams:\n  - {{id: a, url: {not_a_video}, reconnect_backoff_s: 0.05}}\n"
        f"model: {{weights: {model_weights}, imgsz: 160, warmup: false, runtime: torch}}\n"
        f"kafka: {{bootstrap_servers: {closed_port_address()}, client_process: false}}\n"
        "http: {host: 127.0.0.1, port: 0}\n",
        encoding="utf-8",
    )
    code, _, err = run_cli(["run", "-c", str(path), "--duration", "60"])
    assert code == 1, err
    assert "Traceback" not in err, err
    assert "all sources finished" in err, "the run must end because the file was given up on, not by --duration"
    errors = [line for line in err.splitlines() if " ERROR pipeline: " in line]
    assert len(errors) == 1 and "without giving a single frame" in errors[0], err


def test_run_with_one_unreadable_file_among_good_ones_processes_the_good_ones_and_exits_1_naming_it(
    tmp_path: Path, model_weights: str, clips: dict[str, Path]
) -> None:
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_bytes(b"this is not a video")
    path = tmp_path / "config.yaml"
    path.write_text(
        f"streams:\n  - {{id: good, url: {clips['landscape']}, realtime: false}}\n"
        f"  - {{id: broken, url: {not_a_video}, reconnect_backoff_s: 0.05}}\n"
        f"model: {{weights: {model_weights}, imgsz: 160, warmup: false, runtime: torch}}\n"
        f"kafka: {{bootstrap_servers: {closed_port_address()}, client_process: false}}\n"
        "http: {host: 127.0.0.1, port: 0}\n",
        encoding="utf-8",
    )
    code, _, err = run_cli(["run", "-c", str(path), "--duration", "60"])
    assert code == 1, err
    assert "all sources finished" in err and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if " ERROR pipeline: " in line]
    assert len(errors) == 1 and "stream(s) broken ended without giving a single frame" in errors[0], err
    assert "stopped: 12 frame(s) read" in err, "the good file must still be processed to its end"


@pytest.mark.parametrize(("setting", "key_path"), [
    ("model.classes=[giraffe]", "model.classes"),
    ('streams.0.analytics={zones: [{id: z, polygon: [[0, 0], [100, 0], [100, 100]], classes: [giraffe]}]}',
     "stream a: analytics.zones[0].classes"),
], ids=["model-classes", "zone-classes"])
def test_run_with_a_class_the_model_does_not_have_exits_2_naming_the_key(
        tmp_path: Path, model_weights: str, clips: dict[str, Path], setting: str, key_path: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"streams:\n  - {{id: a, url: {clips['landscape']}}}\n"
        f"model: {{weights: {model_weights}, imgsz: 160, warmup: false, runtime: torch}}\n"
        f"kafka: {{bootstrap_servers: {closed_port_address()}, client_process: false}}\n"
        "http: {host: 127.0.0.1, port: 0}\n",
        encoding="utf-8",
    )
    code, _, err = run_cli(["run", "-c", str(path), "--set", setting, "--duration", "30"])
    assert code == 2, err
    assert "Traceback" not in err, err
    assert f"invalid config {path}: {key_path}: 'giraffe' is not a class of the model" in err, err


class FailingPipeline:
    """Starts its HTTP part, then fails the way a missing model does."""

    instances: list[FailingPipeline] = []

    def __init__(self, config: PipelineConfig, config_path: Path | None = None) -> None:
        self.stopped = False
        self.readers: dict[str, Any] = {}
        FailingPipeline.instances.append(self)

    def start(self, max_frames: int | None = None) -> None:
        raise FileNotFoundError("[Errno 2] No such file or directory: 'nosuchmodel.pt'")

    def stop(self) -> None:
        self.stopped = True


def test_run_stops_what_it_started_when_start_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(pipeline.app, "Pipeline", FailingPipeline)
    FailingPipeline.instances.clear()
    path = config_file(tmp_path)
    assert run_pipeline(load_config(path), path, [], watch=False) == 1
    assert [instance.stopped for instance in FailingPipeline.instances] == [True]
    assert any("cannot start" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("bound", [["--duration", "-3"], ["--duration", "0"], ["--max-frames", "-1"],
                                   ["--max-frames", "2.5"]], ids=lambda value: " ".join(value))
def test_run_bounds_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str], bound: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "-c", str(config_file(tmp_path)), *bound])
    assert exit_info.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and bound[0] in errors[0], errors


def test_demo_with_its_port_taken_says_how_to_pick_another_and_stops_its_broker(
    tmp_path: Path, taken_port: int
) -> None:
    clips = tmp_path / "cache" / "vap" / "demo-clips-v1"
    clips.mkdir(parents=True)
    for name in ("demo-street", "demo-portrait", "demo-yard"):
        (clips / f"{name}.mp4").write_bytes(b"not read: the demo stops before any stream opens")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), VAP_DEMO_HTTP_PORT=str(taken_port))
    code, out, err = run_cli(["demo", "--duration", "5"], env=env)
    assert code == 1, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "vap demo:" in line]
    assert len(errors) == 1 and str(taken_port) in errors[0] and "VAP_DEMO_HTTP_PORT" in errors[0], err
    broker_port = re.search(r"embedded broker on 127\.0\.0\.1:(\d+)", out)
    assert broker_port is not None, out
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", int(broker_port[1])), 1):
        pass


def test_a_closed_terminal_stops_the_demo_gracefully_and_its_broker_with_it(tmp_path: Path) -> None:
    """SIGHUP (the terminal closed): the broker runs in its own session, so only the demo can stop it."""
    clips = tmp_path / "cache" / "vap" / "demo-clips-v1"
    clips.mkdir(parents=True)
    for name in ("demo-street", "demo-portrait", "demo-yard"):
        (clips / f"{name}.mp4").write_bytes(b"not a video: its reader backs off, the demo runs on")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), VAP_DEMO_HTTP_PORT="0",
               VAP_DEMO_DASHBOARD_PORT="0")
    args = ["demo", "--duration", "120", "--set", "model.runtime=torch", "--set", "model.warmup=false"]
    with vap_process(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env) as demo:
        assert demo.stdout is not None
        lines = [demo.stdout.readline().decode() for _ in range(4)]
        dashboard = re.fullmatch(r"vap demo: open the dashboard: http://127\.0\.0\.1:(\d+)/\n", lines[0])
        assert dashboard is not None, lines  # the first thing a new user sees
        broker_port = next((m for line in lines if (m := re.search(r"embedded broker on [\d.]+:(\d+)", line))), None)
        assert broker_port is not None, lines
        while "warm in" not in lines[-1]:
            lines.append(demo.stdout.readline().decode())
            assert lines[-1], lines
        assert http_call(int(dashboard[1]), "GET", "/healthz")[0] == 200
        demo.send_signal(signal.SIGHUP)
        out, _ = demo.communicate(timeout=60)
    assert "broker stopped" in out.decode(), out
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", int(broker_port[1])), 1):
        pass


def test_embedded_broker_interrupted_while_starting_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    broker = EmbeddedBroker()

    def interrupted(_timeout_s: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(broker, "_wait_until_listening", interrupted)
    with pytest.raises(KeyboardInterrupt):
        broker.start()
    assert broker._process is None, "the broker process was left running"


def test_consume_from_an_unreachable_broker_fails_in_bounded_time_with_one_line(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    address = closed_port_address()
    started = time.monotonic()
    out = io.StringIO()
    assert consume(ConsumeOptions(bootstrap=address, topic="vap.frames", connect_timeout_s=1.0), out) == 1
    assert time.monotonic() - started < 10
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and address in errors[0] and "--bootstrap" in errors[0], errors
    assert not [record for record in caplog.records if record.name.startswith("kafka")]


def test_consume_skips_messages_that_are_not_results_and_goes_on(
    broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    topic = unused_topic("consume-foreign")
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        admin.close()
    result = {"schema": "vap.frame.v1", "stream_id": "cam-ok", "frame_id": 7, "captured_at": "2026-01-01T00:00:00Z",
              "latency_ms": {"total": 1.5}, "detections": [{"label": "person"}]}
    event = {"schema": "vap.event.v1", "stream_id": "cam-ok", "frame_id": 8, "occurred_at": "2026-01-01T00:00:01Z",
             "event": "enter", "zone_kind": "zone", "zone_id": "dock", "track_id": 3, "label": "person"}
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    try:
        for value in (b"not json", b"[1, 2]", b'{"schema": "vap.event.v1"}', b'{"schema": "shop.order.v2"}',
                      b'{"detections": []}', orjson.dumps(result), orjson.dumps(event)):
            producer.send(topic, key=b"cam", value=value).get(timeout=10)
    finally:
        producer.close()
    out = io.StringIO()
    options = ConsumeOptions(bootstrap=broker.bootstrap_servers, topic=topic, from_beginning=True, max_messages=2,
                             idle_timeout_s=15)
    with caplog.at_level(logging.WARNING, logger="pipeline.tools.consume"):
        assert consume(options, out) == 0
    frame_header, frame_row, event_header, event_row = out.getvalue().splitlines()
    assert frame_header.startswith("captured_at") and "cam-ok" in frame_row and "person x1" in frame_row
    assert event_header.startswith("occurred_at") and "enter zone dock track 3 person" in event_row
    skipped = [record.getMessage() for record in caplog.records if record.name == "pipeline.tools.consume"]
    assert len(skipped) == 5 and "not JSON" in skipped[0] and "'shop.order.v2'" in skipped[3], skipped

    as_json = io.StringIO()
    assert consume(ConsumeOptions(bootstrap=broker.bootstrap_servers, topic=topic, from_beginning=True,
                                  output_format="json", idle_timeout_s=3), as_json) == 0
    printed = [orjson.loads(line)["schema"] for line in as_json.getvalue().splitlines()]
    assert printed == ["vap.event.v1", "vap.frame.v1", "vap.event.v1"], "JSON passes vap's messages through as is"


def test_consume_with_a_bootstrap_that_is_no_address_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert consume(ConsumeOptions(bootstrap="broker:kafka", topic="vap.frames", connect_timeout_s=1.0),
                   io.StringIO()) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "--bootstrap broker:kafka is not HOST:PORT" in errors[0], errors


def test_consume_says_once_that_the_broker_is_lost_and_once_that_it_is_back(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with EmbeddedBroker() as broker:
        topic = unused_topic("consume-lost")
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        result = {"schema": "vap.frame.v1", "stream_id": "cam", "frame_id": 0, "latency_ms": {"total": 1.0},
                  "detections": []}
        producer.send(topic, key=b"cam", value=orjson.dumps(result)).get(timeout=10)
        producer.close()
        out = io.StringIO()

        def restart_the_broker_once_a_message_is_printed() -> None:
            deadline = time.monotonic() + 30
            while "cam" not in out.getvalue() and time.monotonic() < deadline:
                time.sleep(0.05)
            broker.stop()
            time.sleep(3)
            broker.start()

        restarter = threading.Thread(target=restart_the_broker_once_a_message_is_printed)
        restarter.start()
        options = ConsumeOptions(bootstrap=broker.bootstrap_servers, topic=topic, from_beginning=True,
                                 idle_timeout_s=12)
        assert consume(options, out) == 0
        restarter.join()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"vap consume: lost the broker at {broker.bootstrap_servers} ("), lines
    assert lines[1] == f"vap consume: the broker at {broker.bootstrap_servers} answers again", lines
    assert not [record for record in caplog.records if record.name.startswith("kafka")]


def test_dashboard_prints_its_url_says_kafka_is_away_and_stops_on_sigterm(tmp_path: Path) -> None:
    args = ["dashboard", "--bootstrap", closed_port_address(), "--port", "0"]
    with vap_process(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        found = re.match(r"vap dashboard: http://127\.0\.0\.1:(\d+)/ ", line)
        assert found is not None, line
        port = int(found[1])
        assert http_call(port, "GET", "/healthz")[0] == 200
        wait_for(lambda: http_call(port, "GET", "/api/streams")[1]["broker"]["state"] == "unreachable", 10,
                 "the dashboard did not report the unreachable broker")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


def test_dashboard_bad_config_exits_2_and_a_taken_port_exits_1_each_with_one_line(tmp_path: Path,
                                                                                   taken_port: int) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kafka: {topic: 'no spaces allowed'}\n", encoding="utf-8")
    code, _, err = run_cli(["dashboard", "-c", str(bad)])
    assert code == 2 and "kafka.topic" in err and "Traceback" not in err, err
    code, _, err = run_cli(["dashboard", "--port", str(taken_port)])
    assert code == 1 and "Traceback" not in err, err
    assert err.strip() == f"vap dashboard: cannot listen on 127.0.0.1:{taken_port} (--port): Address already in use"
