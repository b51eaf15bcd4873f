"""INT8 on the CPU: the config's rules, quantizing the bundled model on its shipped calibration set (cached,
keyed by the calibration), and its detections against ground truth through the real pipeline and broker."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import ModelConfig, parse_config
from pipeline.errors import ConfigError
from pipeline.inference.quantize import BUNDLED_SET, Int8Calibration, calibration_for
from pipeline.inference.runtimes import export_path, resolve_model, runtime_available
from pipeline.tools.broker import EmbeddedBroker
from pipeline.tools.demo import SHIPPED_WEIGHTS
from pipeline.tools.synth.clips import load_ground_truth, write_clip
from pipeline.tools.synth.evaluate import AccuracyStats
from pipeline.tools.synth.world import SceneSpec
from tests.conftest import decode, read_topic, run_to_completion, unused_topic
from tests.test_accuracy import MIN_MASK_IOU, MIN_PRECISION, MIN_RECALL, score

needs_openvino = pytest.mark.skipif(not runtime_available("openvino") or not SHIPPED_WEIGHTS.is_file(),
                                    reason="needs openvino and the bundled model")


def config_error(model: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as raised:
        parse_config({"streams": [{"id": "a", "url": "rtsp://192.0.2.1/x"}], "model": model})
    return raised.value.problems


def test_int8_where_it_cannot_run_is_a_config_error_naming_the_key() -> None:
    ((key, message),) = config_error({"precision": "int8", "runtime": "torch"})
    assert key == "model.precision" and "OpenVINO" in message and "torch" in message
    ((key, message),) = config_error({"precision": "int8", "device": "cuda:0"})
    assert key == "model.precision" and "cuda:0" in message and "fp16" in message
    ((key, message),) = config_error({"precision": "int8", "device": ["cuda:0", "cuda:1"]})
    assert key == "model.precision"
    ((key, message),) = config_error({"precision": "fp32", "half": True})
    assert key == "model.half" and "model.precision" in message


def test_half_keeps_working_and_precision_says_the_same_more_plainly() -> None:
    assert ModelConfig().effective_precision("cpu") == "fp32"
    assert ModelConfig().effective_precision("cuda:0") == "fp16"
    assert ModelConfig(half=True).effective_precision("cpu") == "fp16"
    assert ModelConfig(half=False).effective_precision("cuda:0") == "fp32"
    assert ModelConfig(precision="int8").effective_precision("cpu") == "int8"


def test_calibration_sources_and_their_errors(tmp_path: Path) -> None:
    bundled = calibration_for(ModelConfig(weights=str(SHIPPED_WEIGHTS), precision="int8"), ["rtsp://x/1"])
    assert "bundled" in bundled.describe and len(list(BUNDLED_SET.glob("*.jpg"))) == 128
    streams = calibration_for(ModelConfig(weights="other.pt", precision="int8"), ["rtsp://x/1", "rtsp://x/2"])
    assert "2 stream(s)" in streams.describe and streams.key != bundled.key
    empty = tmp_path / "empty"
    empty.mkdir()
    for source, expected in ((empty, "holds no images"), (tmp_path / "missing", "not found")):
        with pytest.raises(ConfigError) as raised:
            calibration_for(ModelConfig(weights="other.pt", precision="int8", calibration=source), [])
        ((key, message),) = raised.value.problems
        assert key == "model.calibration" and expected in message
    with pytest.raises(ConfigError) as raised:
        calibration_for(ModelConfig(weights="other.pt", precision="int8"), [])
    assert raised.value.problems[0][0] == "model.calibration"
    clip = write_clip(tmp_path / "clip.mp4", SceneSpec(width=160, height=96, n_frames=12, seed=3))
    from_clip = calibration_for(ModelConfig(weights="other.pt", precision="int8", calibration=clip,
                                            calibration_frames=8), [])
    assert len(from_clip.frames()) == 8


@pytest.fixture(scope="module")
def int8_exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("int8-exports")


@needs_openvino
def test_the_bundled_model_is_quantized_once_per_calibration_and_reused(
        int8_exports: Path, caplog: pytest.LogCaptureFixture) -> None:
    calibration = calibration_for(ModelConfig(weights=str(SHIPPED_WEIGHTS), precision="int8"), [])
    reads: list[int] = []

    def counted() -> list[Any]:
        frames = calibration.frames()
        reads.append(len(frames))
        return frames

    tracked = Int8Calibration(calibration.key, calibration.describe, counted)
    with caplog.at_level(logging.INFO, logger="pipeline.inference.quantize"):
        first = resolve_model(str(SHIPPED_WEIGHTS), "auto", "cpu", 320, 4, False, int8_exports, tracked)
    assert first.runtime == "openvino" and "int8" in first.path and reads == [128]
    assert any("calibrating: 128/128" in record.getMessage() for record in caplog.records), "no progress shown"
    xml = next(Path(first.path).glob("*.xml")).read_text(encoding="utf-8")
    assert "FakeQuantize" in xml or "i8" in xml or "u8" in xml, "the model holds no 8-bit operations"

    again = resolve_model(str(SHIPPED_WEIGHTS), "auto", "cpu", 320, 4, False, int8_exports, tracked)
    assert again == first and reads == [128], "a second start must reuse the quantized model, not calibrate"
    cached = export_path(str(SHIPPED_WEIGHTS), "openvino", "cpu", 320, 4, False, int8_exports, calibration.key)
    assert first.path == str(cached), "the cache key names the calibration data"
    assert export_path(str(SHIPPED_WEIGHTS), "openvino", "cpu", 320, 4, False, int8_exports, "other-data") != cached


@pytest.fixture
def accuracy_clips(tmp_path: Path) -> Iterator[dict[str, tuple[Path, tuple[int, int]]]]:
    sizes = {"wide": (640, 360, 5101), "tall": (480, 640, 5102)}  # the scenes of tests/test_accuracy.py
    yield {name: (write_clip(tmp_path / f"{name}.mp4", SceneSpec(width=w, height=h, n_frames=30, seed=seed)), (w, h))
           for name, (w, h, seed) in sizes.items()}


def run_at(precision: str, clips: dict[str, tuple[Path, tuple[int, int]]], exports: Path,
           broker: EmbeddedBroker) -> AccuracyStats:
    """Both clips through the real pipeline and broker at `precision` (OpenVINO either way), scored together."""
    topic = unused_topic(f"accuracy-{precision}")
    config = parse_config({
        "streams": [{"id": name, "url": str(path), "realtime": False} for name, (path, _) in clips.items()],
        "model": {"weights": str(SHIPPED_WEIGHTS), "imgsz": 320, "precision": precision, "runtime": "openvino",
                  "export_dir": str(exports)},
        "batching": {"max_batch": 4, "max_wait_ms": 10},
        "kafka": {"bootstrap_servers": broker.bootstrap_servers, "topic": topic},
        "http": {"host": "127.0.0.1", "port": 0},
    })
    pipeline = run_to_completion(config, timeout_s=240)
    assert pipeline.detector is not None and pipeline.detector.runtime == "openvino"
    assert getattr(pipeline.detector, "precision", None) == precision
    messages: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in clips}
    for record in read_topic(broker.bootstrap_servers, topic, expected=60):
        message = decode(record)
        messages[message["stream_id"]][message["frame_id"]] = message
    stats = AccuracyStats()
    for name, (path, size) in clips.items():
        stats.merge(score(messages[name], load_ground_truth(path), size))
    return stats


@needs_openvino
def test_int8_detections_match_ground_truth_through_the_pipeline_and_a_real_broker(
        int8_exports: Path, broker: EmbeddedBroker, accuracy_clips: dict[str, tuple[Path, tuple[int, int]]]) -> None:
    int8 = run_at("int8", accuracy_clips, int8_exports, broker)
    fp32 = run_at("fp32", accuracy_clips, int8_exports, broker)
    assert int8.recall >= MIN_RECALL and int8.precision >= MIN_PRECISION, int8.summary()
    assert int8.mean_mask_iou >= MIN_MASK_IOU, int8.summary()
    assert abs(int8.recall - fp32.recall) <= 0.02 and abs(int8.precision - fp32.precision) <= 0.02, (
        int8.summary(), fp32.summary())


@needs_openvino
def test_calibration_frames_that_cannot_be_read_stop_vap_run_with_exit_2_naming_the_key(tmp_path: Path) -> None:
    import shutil
    import subprocess

    from tests.conftest import vap_process

    weights = tmp_path / "my-model.pt"  # not the bundled file: no shipped calibration set applies
    shutil.copyfile(SHIPPED_WEIGHTS, weights)
    clip = write_clip(tmp_path / "clip.mp4", SceneSpec(width=160, height=96, n_frames=4, seed=3))
    empty = tmp_path / "no-images"
    empty.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(f"streams:\n  - {{id: a, url: {clip}}}\nmodel: {{weights: {weights}, imgsz: 160, "
                      f"precision: int8, calibration: {empty}, export_dir: {tmp_path / 'exports'}}}\n"
                      "http: {host: 127.0.0.1, port: 0}\nkafka: {bootstrap_servers: '127.0.0.1:9'}\n",
                      encoding="utf-8")
    with vap_process(["run", "-c", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        _, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    assert f"model.calibration: {empty} holds no images" in err.decode() and b"Traceback" not in err
