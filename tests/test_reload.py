"""Config hot reload: file edits and SIGHUP apply stream changes within seconds; JSON logs name streams."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import StreamConfig, parse_config
from pipeline.errors import StreamExists, UnknownStream
from pipeline.ops.reload import ConfigReloader, plan_reload
from pipeline.tools.broker import EmbeddedBroker, free_port
from tests.conftest import metric_value, scrape, stop_with_sigterm, vap_process


def tree(streams: list[dict[str, Any]], **sections: Any) -> dict[str, Any]:
    return {"streams": streams, **sections}


def test_plan_adds_removes_restarts_and_names_sections_that_need_a_restart() -> None:
    current = parse_config(tree([{"id": "a", "url": "rtsp://h/a"}, {"id": "b", "url": "rtsp://h/b"},
                                 {"id": "c", "url": "rtsp://h/c"}]))
    new = parse_config(tree([{"id": "a", "url": "rtsp://h/a"}, {"id": "c", "url": "rtsp://h/c", "fps": 5},
                             {"id": "d", "url": "rtsp://h/d"}], model={"imgsz": 320}))
    plan = plan_reload(current, new)
    assert [s.id for s in plan.add] == ["d"]
    assert plan.remove == ("b",)
    assert [s.id for s in plan.restart] == ["c"]
    assert plan.needs_restart == ("model.imgsz",)
    assert plan_reload(current, current).empty


@pytest.mark.parametrize(("section", "values", "changed"), [
    ("tracking", {"tracker": "botsort"}, "tracking.tracker"),
    ("tracking", {"events_topic": "site.events"}, "tracking.events_topic"),
    ("batching", {"max_batch": 4}, "batching.max_batch"),
    ("kafka", {"topic": "site.frames"}, "kafka.topic"),
    ("http", {"port": 9200}, "http.port"),
], ids=["tracker", "events-topic", "batching", "kafka", "http"])
def test_a_change_in_any_section_but_streams_is_named_as_needing_a_restart(
    section: str, values: dict[str, Any], changed: str
) -> None:
    streams = [{"id": "a", "url": "rtsp://h/a"}]
    plan = plan_reload(parse_config(tree(streams)), parse_config(tree(streams, **{section: values})))
    assert plan.needs_restart == (changed,)
    assert not plan.empty


def test_reload_logs_a_changed_tracker_as_needing_a_restart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reloader, control, path = reloader_over(tmp_path, [stream("a")])
    path.write_text(yaml.safe_dump(tree([stream("a")], tracking={"tracker": "botsort"})), encoding="utf-8")
    with caplog.at_level("INFO", logger="pipeline.ops.reload"):
        assert reloader.reload() is not None
    warnings = messages(caplog, logging.WARNING)
    assert any("tracking.tracker" in m and "needs a restart" in m for m in warnings), warnings
    assert control.calls == []


class RunningReader:
    def __init__(self, config: StreamConfig) -> None:
        self.config = config


class FakeStreams:
    """The pipeline's stream control as the reloader and the control API share it: same ids, same errors."""

    def __init__(self, streams: list[StreamConfig], refuse: tuple[str, ...] = ()) -> None:
        self.readers = {stream.id: RunningReader(stream) for stream in streams}
        self.refuse = set(refuse)
        self.calls: list[str] = []

    def add_stream(self, stream: StreamConfig) -> None:
        self.calls.append(f"add {stream.id}")
        if stream.id in self.readers:
            raise StreamExists(stream.id)
        if stream.id in self.refuse:
            raise ValueError("decoder: cuda needs PyNvVideoCodec")
        self.readers[stream.id] = RunningReader(stream)

    def remove_stream(self, stream_id: str) -> None:
        self.calls.append(f"remove {stream_id}")
        if self.readers.pop(stream_id, None) is None:
            raise UnknownStream(stream_id)

    def running(self) -> dict[str, StreamConfig]:
        return {stream_id: reader.config for stream_id, reader in self.readers.items()}

    def sync_file_streams(self, streams: list[StreamConfig]) -> bool:
        return False  # not in fleet mode


def stream(stream_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": stream_id, "url": f"rtsp://192.0.2.1/{stream_id}", **fields}


def reloader_over(tmp_path: Path, streams: list[dict[str, Any]], refuse: tuple[str, ...] = ()
                  ) -> tuple[ConfigReloader, FakeStreams, Path]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree(streams)), encoding="utf-8")
    current = parse_config(tree(streams))
    control = FakeStreams(list(current.streams), refuse)
    return ConfigReloader(path, [], current, control, watch=False), control, path


def edit(path: Path, streams: list[dict[str, Any]]) -> None:
    path.write_text(yaml.safe_dump(tree(streams)), encoding="utf-8")


def messages(caplog: pytest.LogCaptureFixture, level: int = 0) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= level]


def test_reload_accepts_stream_changes_the_control_api_made_the_same_way(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reloader, control, path = reloader_over(tmp_path, [stream("a"), stream("b")])
    control.remove_stream("b")
    control.add_stream(parse_config(tree([stream("c")])).streams[0])
    control.calls.clear()
    edit(path, [stream("a"), stream("c")])
    with caplog.at_level("INFO", logger="pipeline.ops.reload"):
        assert reloader.reload() is not None
    assert set(control.running()) == {"a", "c"}
    assert control.calls == ["remove b"], "c already runs as the file says: it must not be restarted"
    assert not messages(caplog, logging.ERROR) and any("config reloaded" in m for m in messages(caplog))
    edit(path, [stream("a")])
    reloader.reload()
    assert set(control.running()) == {"a"}, "the reloader must know c runs and remove it when the file does"


def test_reload_puts_the_files_config_on_a_stream_the_api_added_or_removed(tmp_path: Path) -> None:
    reloader, control, path = reloader_over(tmp_path, [stream("a"), stream("b")])
    control.remove_stream("b")
    control.add_stream(parse_config(tree([stream("c")])).streams[0])
    edit(path, [stream("a"), stream("b", fps=5), stream("c", fps=2)])
    reloader.reload()
    running = control.running()
    assert (running["b"].fps, running["c"].fps) == (5, 2)


def test_reload_that_fails_for_one_stream_says_so_and_tries_again_next_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reloader, control, path = reloader_over(tmp_path, [stream("a")], refuse=("gpu",))
    edit(path, [stream("a"), stream("gpu"), stream("ok")])
    reloader.reload()
    assert set(control.running()) == {"a", "ok"}
    errors = messages(caplog, logging.ERROR)
    assert any("gpu" in m and "PyNvVideoCodec" in m for m in errors), errors
    assert any("in part" in m and "gpu" in m for m in errors), errors
    assert not any("running config stays" in m for m in messages(caplog))
    control.refuse.clear()
    reloader.reload()
    assert set(control.running()) == {"a", "gpu", "ok"}


def wait_for_metric(port: int, name: str, stream: str, predicate: Any, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    last: float | None = None
    while time.monotonic() < deadline:
        try:
            last = metric_value(scrape(port), name, stream=stream)
        except OSError:
            last = None
        if predicate(last):
            return time.monotonic()
        time.sleep(0.1)
    raise AssertionError(f"{name}{{stream={stream}}} stayed at {last}")


def test_editing_the_config_during_a_run_adds_and_removes_streams_within_5_seconds(
    tmp_path: Path, broker: EmbeddedBroker, clips: dict[str, Path], model_weights: str
) -> None:
    port = free_port()
    config = tree(
        [{"id": "keep", "url": str(clips["landscape"]), "loop": True},
         {"id": "old", "url": str(clips["portrait"]), "loop": True}],
        model={"weights": model_weights, "imgsz": 160},
        kafka={"bootstrap_servers": broker.bootstrap_servers, "topic": "reload"},
        http={"host": "127.0.0.1", "port": port},
    )
    path = tmp_path / "watched.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    log_path = tmp_path / "vap.log"
    with (log_path.open("w") as log_file,
          vap_process(["--log-format", "json", "run", "-c", str(path), "--watch"], env=dict(os.environ),
                      stderr=log_file) as process):
        wait_for_metric(port, "vap_frames_processed_total", "old", lambda v: (v or 0) > 3, 90)
        config["streams"] = [config["streams"][0], {"id": "new", "url": str(clips["portrait"]), "loop": True}]
        edited_at = time.monotonic()
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        added_at = wait_for_metric(port, "vap_frames_processed_total", "new", lambda v: (v or 0) > 0, 5)
        removed_at = wait_for_metric(port, "vap_stream_up", "old", lambda v: v is None, 5)
        assert max(added_at, removed_at) - edited_at <= 5
        config["streams"].append({"id": "by-sighup", "url": str(clips["portrait"]), "loop": True})
        config["model"]["imgsz"] = 320
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        process.send_signal(signal.SIGHUP)
        wait_for_metric(port, "vap_frames_processed_total", "by-sighup", lambda v: (v or 0) > 0, 5)
        stop_with_sigterm(process)
    entries = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert entries, "--log-format json must print JSON lines"
    assert any(e.get("stream") == "new" and "added" in e["message"] for e in entries)
    assert any(e.get("stream") == "old" and "removed" in e["message"] for e in entries)
    assert any("model.imgsz" in e["message"] and "restart" in e["message"] for e in entries)
