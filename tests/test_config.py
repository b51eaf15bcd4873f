"""Config parsing and `vap validate`: every mistake exits 2 with a one-line message naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, apply_override, interpolate_env, load_config

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"not checked by validation")
    return path


BAD_CONFIGS = [
    pytest.param("streams:\n  - {id: a, url: /nonexistent/clip.mp4}\n", "streams[0].url", "file not found",
                 id="missing-file"),
    pytest.param("streams:\n  - {id: a, url: 'ftp://cam/stream'}\n", "streams[0].url", "unsupported scheme",
                 id="bad-url-scheme"),
    pytest.param("streams:\n  - {id: a, url: CLIP}\n  - {id: a, url: CLIP}\n", "streams", "duplicate stream id",
                 id="duplicate-ids"),
    pytest.param("streams:\n  - {id: a, url: CLIP}\nbatching: {max_bach: 4}\n", "batching.max_bach", "unknown key",
                 id="unknown-key"),
    pytest.param("streams:\n  - {id: a, url: CLIP}\nbatching: {max_batch: -1}\n", "batching.max_batch",
                 "greater than or equal to 1", id="negative-max-batch"),
    pytest.param("streams:\n  - {id: 'cam 1', url: CLIP}\n", "streams[0].id", "pattern", id="bad-stream-id"),
    pytest.param("streams: []\n", "streams", "at least 1", id="no-streams"),
    pytest.param("streams:\n  - {id: a, url: CLIP}\nmodel: {imgsz: 300}\n", "model.imgsz", "multiple of 32",
                 id="imgsz-not-stride-multiple"),
    pytest.param("streams:\n  - {id: a, url: CLIP}\nkafka: {compression: brotli}\n", "kafka.compression",
                 "Input should be", id="unknown-compression"),
]


@pytest.mark.parametrize(("text", "key", "reason"), BAD_CONFIGS)
def test_invalid_config_exits_2_naming_the_key(
    tmp_path: Path, clip: Path, capsys: pytest.CaptureFixture[str], text: str, key: str, reason: str
) -> None:
    path = write(tmp_path, text.replace("CLIP", str(clip)))
    assert main(["validate", "-c", str(path)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1, errors
    assert f": {key}: " in errors[0] and reason in errors[0], errors[0]


def test_run_refuses_an_invalid_config_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "streams:\n  - {id: a, url: /nonexistent/clip.mp4}\n")
    assert main(["run", "-c", str(path)]) == 2
    assert "streams[0].url: file not found" in capsys.readouterr().err


def test_every_mistake_is_reported_not_only_the_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "streams:\n  - {id: a, url: 'ftp://x', fps: -3}\nhttp: {prot: 1}\n")
    assert main(["validate", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "streams[0].url" in err and "streams[0].fps" in err and "http.prot" in err


def test_valid_config_exits_0(tmp_path: Path, clip: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, f"streams:\n  - {{id: cam-1, url: {clip}}}\n  - {{id: cam-2, url: 'rtsp://h/s'}}\n")
    assert main(["validate", "-c", str(path)]) == 0
    assert "valid" in capsys.readouterr().out


def test_shipped_example_site_config_is_valid_once_its_weights_exist(tmp_path: Path) -> None:
    example = str(REPO / "configs" / "site-example.yaml")
    assert main(["validate", "-c", example]) == 2
    weights = tmp_path / "site-model.pt"
    weights.write_bytes(b"placeholder")
    assert main(["validate", "-c", example, "--set", f"model.weights={weights}"]) == 0


def test_defaults_match_the_design_contract(clip: Path) -> None:
    config = load_config(None, text=f"streams:\n  - {{id: a, url: {clip}}}\n")
    assert (config.model.imgsz, config.model.conf, config.model.iou) == (640, 0.25, 0.45)
    assert (config.batching.max_batch, config.batching.max_wait_ms) == (16, 20)
    assert (config.kafka.topic, config.kafka.compression, config.kafka.acks) == ("vap.frames", "zstd", "all")
    assert (config.http.host, config.http.port) == ("0.0.0.0", 9108)
    assert config.streams[0].kind == "file"


def test_environment_variables_are_interpolated_with_defaults() -> None:
    text = "a: ${HOST}\nb: ${PORT:-9092}\nc: ${EMPTY:-fallback}\n"
    assert interpolate_env(text, {"HOST": "kafka", "EMPTY": ""}) == "a: kafka\nb: 9092\nc: fallback\n"


def test_missing_environment_variable_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="CAM_PASSWORD is not set"):
        interpolate_env("url: rtsp://u:${CAM_PASSWORD}@h/s", {})


def test_set_overrides_keep_yaml_types_and_reach_list_items(clip: Path) -> None:
    config = load_config(
        None,
        ["batching.max_batch=8", "streams.0.fps=5", "model.classes=[0, person]", "kafka.topic=site.results"],
        text=f"streams:\n  - {{id: a, url: {clip}}}\n",
    )
    assert config.batching.max_batch == 8
    assert config.streams[0].fps == 5
    assert config.model.classes == [0, "person"]
    assert config.kafka.topic == "site.results"


def test_set_override_without_equals_sign_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        apply_override({}, "batching.max_batch")


def test_camera_credentials_never_appear_in_redacted_url(clip: Path) -> None:
    config = load_config(None, text="streams:\n  - {id: a, url: 'rtsp://admin:hunter2@10.0.0.5:554/s'}\n")
    assert "hunter2" not in config.streams[0].redacted_url
    assert config.streams[0].redacted_url == "rtsp://***@10.0.0.5:554/s"
