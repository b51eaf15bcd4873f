"""Config hot reload: file edits and SIGHUP apply stream changes within seconds; JSON logs name streams."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.broker import EmbeddedBroker, free_port
from pipeline.config import parse_config
from pipeline.reload import plan_reload
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
