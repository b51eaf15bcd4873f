"""Config parsing and `vap validate`: every mistake exits 2 with a one-line message naming its key."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from pipeline.cli import main
from pipeline.config import PipelineConfig, apply_override, interpolate_env, load_config
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
ANALYTICS = "streams:\n  - id: a\n    url: CLIP\n    analytics:\n"
NORMALIZED = ANALYTICS + "      normalized: true\n"
TRIANGLE = "[[0, 0], [9, 0], [9, 9]]"


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
    pytest.param("streams:\n  - {id: '..', url: CLIP}\n", "streams[0].id", "names a folder", id="dot-dot-id"),
    pytest.param("streams: []\n", "streams", "is empty; list at least one stream", id="no-streams"),
    pytest.param("streams:\n  - {id: a, url: CLIP}\nmodel: {imgsz: 300}\n", "model.imgsz", "multiple of 32",
                 id="imgsz-not-stride-multiple"),
    pytest.param("streams:\n  - {id: a, url: CLIP}\nkafka: {compression: brotli}\n", "kafka.compression",
                 "Input should be", id="unknown-compression"),
    pytest.param("streams:\n  - {id: a, url: CLIP}\nmodel: {imgsz: 320}\nmodel: {imgsz: 640}\n", "model",
                 "duplicate key at line 4 (first at line 3)", id="duplicate-section"),
    pytest.param("streams:\n  - id: a\n    url: CLIP\n    fps: 5\n    fps: 25\n", "streams[0].fps",
                 "duplicate key at line 5 (first at line 4)", id="duplicate-stream-key"),
    pytest.param("streams:\n  - {id: a, url: 'rtsp://u:${VAP_TEST_UNSET}@h/s'}\n", "streams[0].url",
                 "environment variable VAP_TEST_UNSET is not set", id="unset-variable"),
    pytest.param("streams:\n  - {id: a, url: 'rtsp://u:${VAP_TEST:x}@h/s'}\n", "streams[0].url",
                 "write $${ for a literal ${", id="malformed-reference"),
    pytest.param(ANALYTICS + f"      zones:\n        - {{id: door, polygon: {TRIANGLE}}}\n"
                 f"        - {{id: door, polygon: {TRIANGLE}}}\n",
                 "streams[0].analytics.zones[1].id", "duplicate zone id 'door' (zones[0] has it too)",
                 id="duplicate-zone-ids"),
    pytest.param(ANALYTICS + "      lines:\n        - {id: gate, start: [0, 0], end: [9, 9]}\n"
                 "        - {id: kerb, start: [0, 0], end: [9, 9]}\n        - {id: gate, start: [1, 1], end: [9, 9]}\n",
                 "streams[0].analytics.lines[2].id", "duplicate line id 'gate'", id="duplicate-line-ids"),
    pytest.param(ANALYTICS + "      zones:\n        - {id: z, polygon: [[0, 0], [.inf, 0], [9, 9]]}\n",
                 "streams[0].analytics.zones[0].polygon[1][0]", "finite number", id="infinite-zone-point"),
    pytest.param(ANALYTICS + "      lines:\n        - {id: l, start: [0, .nan], end: [9, 9]}\n",
                 "streams[0].analytics.lines[0].start[1]", "finite number", id="nan-line-end"),
    pytest.param(ANALYTICS + "      lines:\n        - {id: l, start: [4, 5], end: [4, 5]}\n",
                 "streams[0].analytics.lines[0].end", "same point as start", id="line-without-length"),
    pytest.param(ANALYTICS + "      lines:\n        - {id: l, start: [0, 0], end: [9, 9], directions: [in, in]}\n",
                 "streams[0].analytics.lines[0].directions", "both directions are named 'in'",
                 id="same-direction-names"),
    pytest.param(NORMALIZED + "      zones:\n        - {id: z, polygon: [[0, 0], [1, 0], [1, 2.5]]}\n",
                 "streams[0].analytics.zones[0].polygon[2]", "far outside the frame", id="normalized-zone-off-frame"),
    pytest.param(NORMALIZED + "      lines:\n        - {id: l, start: [0.5, 1], end: [640, 0]}\n",
                 "streams[0].analytics.lines[0].end", "fractions from 0 to 1", id="normalized-line-in-pixels"),
    pytest.param("streams:\n  - {id: a, url: CLIP, reconnect_backoff_s: 30, reconnect_backoff_max_s: 5}\n",
                 "streams[0].reconnect_backoff_max_s", "below reconnect_backoff_s (30.0)", id="backoff-max-below"),
    pytest.param("streams:\n  - {id: a, url: CLIP}\nmodel: {device: []}\n", "model.device", "empty list",
                 id="no-devices"),
    pytest.param("streams:\n  - {id: a, url: CLIP}\nmodel: {device: [cpu, auto]}\n", "model.device[1]",
                 "auto cannot be one device of a list", id="auto-in-a-device-list"),
    pytest.param("streams:\n  - {id: a, url: CLIP}\nmodel: {device: mps}\n", "model.device",
                 "use cpu, cuda:N or auto", id="mps-device"),
    pytest.param("streams:\n  - {id: a, url: CLIP}\nmodel: {classes: []}\n", "model.classes",
                 "omit it or use null to keep every class", id="no-classes-kept"),
    pytest.param("streams:\n  - id: a\n    url: CLIP\n    analytics:\n      zones:\n        - {id: z, polygon: "
                 "[[0, 0], [9, 0], [9, 9]], classes: []}\n", "streams[0].analytics.zones[0].classes",
                 "omit it or use null to keep every class", id="zone-counts-no-class"),
    pytest.param("streams:\n  - id: a\n    url: CLIP\n    analytics:\n      lines:\n        - {id: l, start: [0, 0], "
                 "end: [9, 9], classes: []}\n", "streams[0].analytics.lines[0].classes",
                 "omit it or use null to keep every class", id="line-counts-no-class"),
    pytest.param("streams:\n  - {id: a, url: CLIP}\nhttp: {auth_token: ''}\n", "http.auth_token", "is empty",
                 id="empty-api-token"),
    pytest.param("streams:\n  - {id: a, url: CLIP}\nkafka:\n  security_protocol: SASL_SSL\n"
                 "  sasl_mechanism: PLAIN\n  sasl_username: vap\n  sasl_password: \"${VAP_TEST_UNSET:-}\"\n",
                 "kafka.sasl_password", "is empty", id="empty-sasl-password"),
    pytest.param("streams:\n  - {id: a, url: CLIP}\ntracking: {events_topic: vap.frames}\n",
                 "tracking.events_topic", "the topic of the frame results", id="events-into-the-frames-topic"),
]

STILL_VALID = [
    pytest.param("model: {device: [cuda:0, cuda:1]}\n", id="cuda-device-list"),
    pytest.param("model: {device: [cpu, cpu]}\n", id="two-cpu-workers"),
    pytest.param("model: {device: cuda}\n", id="cuda-alone"),
    pytest.param("kafka: {sasl_password: \"${VAP_TEST_UNSET:-}\"}\n", id="empty-password-without-sasl"),
    pytest.param("tracking: {events_topic: site.events}\nkafka: {topic: site.frames}\n", id="own-topics"),
]


@pytest.mark.parametrize("text", STILL_VALID)
def test_the_stricter_checks_still_accept_configs_that_work(tmp_path: Path, clip: Path, text: str) -> None:
    zones = NORMALIZED + "      zones:\n        - {id: z, polygon: [[0, 0], [1, 0], [1, 1]]}\n"
    path = write(tmp_path, zones.replace("CLIP", str(clip)) + text)
    assert main(["validate", "-c", str(path)]) == 0


def test_normalized_points_a_little_past_the_edge_are_accepted(tmp_path: Path, clip: Path) -> None:
    text = NORMALIZED + ("      zones:\n        - {id: z, polygon: [[-0.003, 0], [1.02, 0], [1, 1]]}\n"
                         "      lines:\n        - {id: l, start: [-0.05, 0.6], end: [1.05, 0.6]}\n")
    assert main(["validate", "-c", str(write(tmp_path, text.replace("CLIP", str(clip))))]) == 0


def test_a_config_file_that_is_not_utf8_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes("streams:\n  - {id: caf\u00e9, url: 'rtsp://h/s'}\n".encode("latin-1"))
    assert main(["validate", "-c", str(path)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1, errors
    assert f"{path} is not UTF-8 text" in errors[0] and "Traceback" not in errors[0], errors[0]


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
    untrained = ["--set", "model.weights=yolo11n-seg.yaml", "--set", "model.classes=null"]
    assert main(["validate", "-c", example, *untrained]) == 0, "an untrained model has no class names to match"


def test_validate_checks_class_names_against_the_model_and_reports_every_mismatch(
    tmp_path: Path, clip: Path, model_weights: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, (
        f"streams:\n  - {{id: a, url: {clip}}}\n  - id: b\n    url: {clip}\n    analytics:\n"
        "      zones:\n        - {id: z, polygon: [[0, 0], [9, 0], [9, 9]]}\n"
        "        - {id: y, polygon: [[0, 0], [9, 0], [9, 9]], classes: [giraffe]}\n"
        "      lines:\n        - {id: l, start: [0, 0], end: [9, 9], classes: [0, 9999]}\n"
        f"model: {{weights: {model_weights}, classes: [giraffe]}}\n"
    ))
    assert main(["validate", "-c", str(path)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert [error.split(": ")[1] for error in errors] == [
        "model.classes", "streams[1].analytics.zones[1].classes", "streams[1].analytics.lines[0].classes"], errors
    assert "'giraffe' is not a class of the model" in errors[0] and "9999 is not a class" in errors[2], errors


def test_validate_says_when_it_could_not_check_class_names(
    tmp_path: Path, clip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, f"streams:\n  - {{id: a, url: {clip}}}\nmodel: {{weights: no-such-model.pt}}\n")
    assert main(["validate", "-c", str(path)]) == 0
    assert "class names not checked: model.weights 'no-such-model.pt' is not a file" in capsys.readouterr().out
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a model")
    assert main(["validate", "-c", str(path), "--set", f"model.weights={broken}"]) == 2
    assert f"model.weights: cannot load '{broken}'" in capsys.readouterr().err


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


@pytest.mark.parametrize(("text", "expected"), [
    ("streams:\n  - {id: a, url: rtsp://h/s\n", "not valid YAML at line 3"),
    ("streams:\n  - {id: a, url: ${CAM_URL}}\n", 'quote a ${VAR} reference: {url: "${CAM_URL}"}'),
], ids=["unclosed-mapping", "unquoted-reference-in-flow-mapping"])
def test_invalid_yaml_is_one_line_naming_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    path = write(tmp_path, text)
    assert main(["validate", "-c", str(path)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1, errors
    assert str(path) in errors[0] and expected in errors[0], errors[0]
    assert "<unicode string>" not in errors[0]


@pytest.mark.parametrize("assignment", ["model.classes=[1, 2", "streams.0.url=*a"], ids=["open-list", "alias"])
def test_set_value_that_is_not_yaml_exits_2_naming_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], assignment: str
) -> None:
    path = write(tmp_path, "streams:\n  - {id: a, url: 'rtsp://h/s'}\n")
    assert main(["validate", "-c", str(path), "--set", assignment]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1, errors
    assert f"--set {assignment.split('=')[0]}: " in errors[0] and "cannot be read as YAML" in errors[0]


@pytest.mark.parametrize("text, overrides", [
    ("streams:\n  - {id: a, url: 'admin:S3cr3t@192.0.2.10:554/s'}\n", []),
    ("streams:\n  - {id: a, url: 'rtsp://h/s'}\n", ["kafka.sasl_password=*S3cr3t"]),
    ("streams:\n  - {id: a, url: 'rtsp://h/s'}\n", ["kafka.sasl_password=!S3cr3t"]),
], ids=["url-without-scheme", "set-alias", "set-tag"])
def test_errors_never_print_a_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, overrides: list[str]
) -> None:
    path = write(tmp_path, text)
    assert main(["validate", "-c", str(path), *[arg for o in overrides for arg in ("--set", o)]]) == 2
    captured = capsys.readouterr()
    assert "S3cr3t" not in captured.err + captured.out


def test_a_key_given_twice_on_one_line_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "streams:\n  - {id: a, url: 'rtsp://h/s', fps: 10, fps: 1000}\n")
    assert main(["validate", "-c", str(path)]) == 2
    assert "streams[0].fps: duplicate key twice on line 2" in capsys.readouterr().err


def test_redaction_covers_a_missing_or_short_scheme_and_short_query_names() -> None:
    from pipeline.config import redact_url

    assert redact_url("admin:S3cr3t@192.0.2.10:554/s") == "admin:***@192.0.2.10:554/s"
    assert redact_url("rtsp:/admin:S3cr3t@192.0.2.10/s") == "rtsp:/***@192.0.2.10/s"
    assert redact_url("http://192.0.2.5/cgi?pw=S3cr3t&res=hd") == "http://192.0.2.5/cgi?pw=***&res=hd"
    assert redact_url("/videos/cam@2.mp4") == "/videos/cam@2.mp4"


STREAM = "streams:\n  - {id: a, url: 'rtsp://h/s'}\n"

ENVIRONMENT_VALUES = [
    pytest.param("kafka:\n  acks: ${ACKS:--1}\n", {}, lambda c: c.kafka.acks, "-1", id="acks-default-minus-one"),
    pytest.param("kafka:\n  client_id: ${V}\n", {"V": "pa #ss"}, lambda c: c.kafka.client_id, "pa #ss",
                 id="hash-stays-in-the-value"),
    pytest.param("kafka:\n  client_id: ${V}\n", {"V": "12345"}, lambda c: c.kafka.client_id, "12345",
                 id="digits-stay-text"),
    pytest.param("kafka:\n  client_id: ${V}\n", {"V": "s3cr3t: x"}, lambda c: c.kafka.client_id, "s3cr3t: x",
                 id="colon-space-stays-in-the-value"),
    pytest.param("kafka:\n  client_id: ${V}\n", {"V": "x\nhttp: {port: 1}"}, lambda c: (c.kafka.client_id, c.http.port),
                 ("x\nhttp: {port: 1}", 9108), id="newline-injects-no-key"),
    pytest.param("kafka:\n  client_id: 'v-${V}'\n", {"V": "[1, 2]"}, lambda c: c.kafka.client_id, "v-[1, 2]",
                 id="inside-a-quoted-string"),
    pytest.param("http:\n  port: ${V:-9108}\n", {}, lambda c: c.http.port, 9108, id="number-default"),
    pytest.param("http:\n  port: ${V:-9108}\n", {"V": "9200"}, lambda c: c.http.port, 9200,
                 id="number-from-the-environment"),
    pytest.param("kafka:\n  ssl_check_hostname: ${V}\n", {"V": "false"}, lambda c: c.kafka.ssl_check_hostname,
                 False, id="boolean-from-the-environment"),
    pytest.param("http:\n  auth_token: ${V:-null}\n", {}, lambda c: c.http.auth_token, None, id="null-default"),
    pytest.param("kafka:\n  client_id: ${V}\n", {"V": ""}, lambda c: c.kafka.client_id, "",
                 id="set-but-empty-counts-as-set"),
    pytest.param("kafka:\n  client_id: ${V:-fallback}\n", {"V": ""}, lambda c: c.kafka.client_id, "fallback",
                 id="set-but-empty-takes-the-default"),
    pytest.param("kafka:\n  client_id: $${V}\n", {}, lambda c: c.kafka.client_id, "${V}", id="escaped-reference"),
    pytest.param("kafka:\n  client_id: vap  # ${V} is not needed here\n", {}, lambda c: c.kafka.client_id, "vap",
                 id="reference-in-a-comment-is-ignored"),
]


@pytest.mark.parametrize(("text", "environ", "read", "expected"), ENVIRONMENT_VALUES)
def test_environment_values_are_text_inside_string_values(
    text: str, environ: dict[str, str], read: Any, expected: object
) -> None:
    config: PipelineConfig = load_config(None, text=STREAM + text, environ=environ)
    assert read(config) == expected


def test_a_secret_from_the_environment_reaches_its_field_whole() -> None:
    text = STREAM + "kafka:\n  sasl_username: vap\n  sasl_password: ${KAFKA_PASSWORD}\n"
    config = load_config(None, text=text, environ={"KAFKA_PASSWORD": "pa #ss: x"})
    assert config.kafka.sasl_password is not None
    assert config.kafka.sasl_password.get_secret_value() == "pa #ss: x"


@pytest.mark.parametrize("secret", ["s3cr3t: x", "'s3cr3t", "s3cr3t\nhttp: 1", "[s3cr3t"])
def test_errors_never_print_a_value_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    monkeypatch.setenv("VAP_TEST_SECRET", secret)
    path = write(tmp_path, STREAM + "http:\n  port: ${VAP_TEST_SECRET}\n")
    assert main(["validate", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "http.port" in err and "s3cr3t" not in err, err


NASTY_PASSWORDS = ["Pa#ss1", "pa?ss", "pa/ss", "p@ss", "pa:ss", "a:b@c/d?e#f", "@192.0.2.99:1/", "tr@il@", "%40x"]


@pytest.mark.parametrize("password", NASTY_PASSWORDS)
def test_camera_passwords_with_url_delimiters_are_masked(password: str) -> None:
    config = load_config(None, text=f"streams:\n  - {{id: a, url: 'rtsp://viewer:{password}@192.0.2.10:554/stream1'}}\n")
    redacted = config.streams[0].redacted_url
    assert redacted == "rtsp://***@192.0.2.10:554/stream1"
    assert password not in redacted and "viewer" not in redacted


def test_secret_query_parameters_are_masked_and_plain_urls_kept() -> None:
    config = load_config(None, text=(
        "streams:\n  - {id: a, url: 'http://192.0.2.5/video.cgi?user=admin&pwd=s3cret&res=hd'}\n"
        "  - {id: b, url: 'rtsp://192.0.2.6:554/stream1'}\n  - {id: c, url: /dev/video0}\n"
    ))
    assert [stream.redacted_url for stream in config.streams] == [
        "http://192.0.2.5/video.cgi?user=admin&pwd=***&res=hd", "rtsp://192.0.2.6:554/stream1", "/dev/video0"
    ]


def test_number_like_stream_ids_are_text() -> None:
    text = "streams:\n  - {id: 123, url: 'rtsp://h/a'}\n  - {id: 007, url: 'rtsp://h/b'}\n"
    assert [stream.id for stream in load_config(None, text=text).streams] == ["123", "007"]
    assert load_config(None, ["streams.0.id=0012"], text=text).streams[0].id == "0012"


def validate_commands(config: Path) -> list[str]:
    header = []
    for line in config.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# "))
    return re.findall(r"`(vap validate [^`]+)`", " ".join(header))


def test_example_configs_validate_with_the_command_their_header_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    for name in ("CAM_USER", "CAM_PASSWORD", "KAFKA_BOOTSTRAP", "KAFKA_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    examples = {path.name: validate_commands(path) for path in sorted((REPO / "configs").glob("*.yaml"))}
    assert examples["site-example.yaml"], "the site example's header shows how to check it"
    for name, commands in examples.items():
        for command in commands:
            assert main(shlex.split(command)[1:]) == 0, f"{name}: {command}"
