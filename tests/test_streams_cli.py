"""`vap streams`: the fleet's registry from the command line, against a real broker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main
from pipeline.tools.broker import EmbeddedBroker
from tests.conftest import closed_port_address, unused_topic


def vap(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["streams", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_streams_are_added_listed_replaced_and_removed(broker: EmbeddedBroker,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    where = ["--bootstrap", broker.bootstrap_servers, "--topic", unused_topic("registry")]
    code, out, _ = vap(capsys, "list", *where)
    assert code == EXIT_OK and out.splitlines() == [out.splitlines()[0]] and out.startswith("id "), "a header only"
    code, out, _ = vap(capsys, "add", *where, "--id", "cam-07", "--url", "rtsp://user:pw@192.0.2.7/live",
                       "--set", "fps=5")
    assert code == EXIT_OK and "cam-07: added" in out and "pw" not in out
    code, _, err = vap(capsys, "add", *where, "--id", "cam-07", "--url", "rtsp://192.0.2.8/live")
    assert code == EXIT_FAILURE and "--replace" in err
    code, out, _ = vap(capsys, "list", *where)
    assert code == EXIT_OK and "cam-07" in out and "rtsp://***@192.0.2.7/live" in out and "pw" not in out
    assert vap(capsys, "add", *where, "--id", "cam-07", "--url", "rtsp://192.0.2.8/live", "--replace")[0] == EXIT_OK
    code, out, _ = vap(capsys, "list", *where, "--format", "json")
    [row] = json.loads(out)
    assert row["id"] == "cam-07" and row["origin"] == "api" and row["config"] == {
        "id": "cam-07", "url": "rtsp://192.0.2.8/live"}
    code, out, _ = vap(capsys, "remove", *where, "cam-07")
    assert code == EXIT_OK and "removed" in out
    assert json.loads(vap(capsys, "list", *where, "--format", "json")[1]) == []
    code, _, err = vap(capsys, "remove", *where, "cam-07")
    assert code == EXIT_FAILURE and "no stream 'cam-07'" in err


def test_a_stream_from_a_file_and_a_config_for_the_broker_and_topic(
        broker: EmbeddedBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    topic = unused_topic("registry")
    config = tmp_path / "fleet.yaml"
    config.write_text(yaml.safe_dump({"kafka": {"bootstrap_servers": broker.bootstrap_servers},
                                      "fleet": {"streams_topic": topic, "partitions": 4}}), encoding="utf-8")
    stream = tmp_path / "gate.yaml"
    stream.write_text(yaml.safe_dump({"id": "gate", "url": "rtsp://192.0.2.9/s",
                                      "analytics": {"zones": [{"id": "door", "polygon": [[0, 0], [9, 0], [9, 9]]}]}}),
                      encoding="utf-8")
    assert vap(capsys, "add", "-c", str(config), "-f", str(stream))[0] == EXIT_OK
    code, out, _ = vap(capsys, "list", "-c", str(config), "--format", "json")
    [row] = json.loads(out)
    assert code == EXIT_OK and row["config"]["analytics"]["zones"][0]["id"] == "door" and row["partition"] < 4


@pytest.mark.parametrize(("args", "key"), [
    (["--id", "bad id", "--url", "rtsp://x/y"], "id:"),
    (["--id", "ok", "--url", "rtsp://x/y", "--set", "fps=-1"], "fps:"),
    (["--id", "ok"], "url:"),
    (["--id", "ok", "--url", "rtsp://x/y", "--set", "colour=red"], "colour:"),
])
def test_a_stream_that_is_not_valid_exits_2_naming_its_key(capsys: pytest.CaptureFixture[str], args: list[str],
                                                            key: str) -> None:
    code, _, err = vap(capsys, "add", "--bootstrap", closed_port_address(), *args)
    assert code == EXIT_USAGE and f"vap streams add: {key}" in err, err


def test_an_unreachable_broker_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = vap(capsys, "list", "--bootstrap", closed_port_address())
    assert code == EXIT_FAILURE and out == ""
    assert err.count("\n") == 1 and "cannot reach Kafka" in err, err
