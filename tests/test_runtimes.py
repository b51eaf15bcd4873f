"""Exported runtimes: cached by what determines them, equivalent to PyTorch, and never fatal."""

from __future__ import annotations

import logging
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ModelConfig
from pipeline.inference.detector import UltralyticsDetector, infer
from pipeline.inference.runtimes import OpenVinoRequests, choose_runtime, export_path, resolve_model, runtime_available
from pipeline.tools.synth.world import SceneSpec, render_scene
from tests.fakes import make_frame


def test_auto_prefers_openvino_on_cpu_and_tensorrt_on_cuda_when_installed() -> None:
    expected_cpu = "openvino" if runtime_available("openvino") else "torch"
    assert choose_runtime("auto", "cpu") == expected_cpu
    assert choose_runtime("auto", "cuda:0") == ("tensorrt" if runtime_available("tensorrt") else "torch")
    assert choose_runtime("onnx", "cpu") == "onnx"


def test_non_pt_weights_and_torch_runtime_are_used_as_they_are(tmp_path: Path) -> None:
    assert resolve_model("yolo11n-seg.yaml", "openvino", "cpu", 320, 4, False, tmp_path).runtime == "torch"
    assert resolve_model("missing.pt", "auto", "cpu", 320, 4, False, tmp_path).path == "missing.pt"
    assert not any(tmp_path.iterdir())


def test_a_failed_export_falls_back_to_torch(tmp_path: Path) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a model")
    resolved = resolve_model(str(broken), "onnx", "cpu", 320, 4, False, tmp_path / "exports")
    assert resolved.path == str(broken) and resolved.runtime == "torch"


@pytest.mark.skipif(not runtime_available("openvino"), reason="openvino is not installed")
def test_openvino_export_is_cached_and_detects_what_pytorch_detects(tmp_path: Path, model_weights: str) -> None:
    if not model_weights.endswith(".pt"):
        pytest.skip("needs the bundled .pt model")
    export_dir = tmp_path / "exports"
    first = resolve_model(model_weights, "openvino", "cpu", 320, 4, False, export_dir)
    assert first.runtime == "openvino" and Path(first.path).is_dir()
    again = resolve_model(model_weights, "openvino", "cpu", 320, 4, False, export_dir)
    assert again == first, "a second start must reuse the cached export"
    other_size = resolve_model(model_weights, "openvino", "cpu", 256, 4, False, export_dir)
    assert other_size.path != first.path, "the cache key includes the input size"

    scene = render_scene(SceneSpec(width=480, height=320, n_frames=4, seed=99))
    frames = [replace(make_frame("s", i), image=image) for i, (image, _) in enumerate(scene)]
    base = ModelConfig(weights=model_weights, imgsz=320, export_dir=export_dir)
    torch_results = infer(UltralyticsDetector(base.model_copy(update={"runtime": "torch"}), "cpu", 4), frames)
    openvino = UltralyticsDetector(base.model_copy(update={"runtime": "openvino"}), "cpu", 4)
    assert openvino.runtime == "openvino"
    confident = 0
    for ours, reference in zip(infer(openvino, frames), torch_results, strict=True):
        for box, class_id, confidence in zip(reference.detections.boxes_xyxy, reference.detections.class_ids,
                                             reference.detections.confidences, strict=True):
            if confidence < 0.5:
                continue
            confident += 1
            same_class = ours.detections.boxes_xyxy[ours.detections.class_ids == class_id]
            assert len(same_class) and max(box_iou(box, other) for other in same_class) > 0.9
    assert confident > 0


@pytest.mark.skipif(not runtime_available("openvino"), reason="openvino is not installed")
def test_openvino_requests_in_flight_together_each_return_their_own_batch(tmp_path: Path, model_weights: str) -> None:
    if not model_weights.endswith(".pt"):
        pytest.skip("needs the bundled .pt model")
    exported = resolve_model(model_weights, "openvino", "cpu", 160, 2, False, tmp_path)
    requests = OpenVinoRequests(exported.path)
    if requests.size < 2:
        pytest.skip("OpenVINO gives this CPU a single stream, so nothing runs at once")
    generator = np.random.default_rng(1)
    batches = [generator.integers(0, 256, (2, 96, 160, 3), dtype=np.uint8) for _ in range(requests.size)]
    alone = [requests.finish(requests.start(batch)) for batch in batches]
    reused = np.empty_like(batches[0])  # as the letterbox reuses its buffer: each request keeps its own copy
    running = []
    for batch in batches:
        reused[...] = batch
        running.append(requests.start(reused))
    together = [requests.finish(request) for request in reversed(running)][::-1]
    for one, other in zip(alone, together, strict=True):
        for output_alone, output_together in zip(one, other, strict=True):
            np.testing.assert_allclose(output_together, output_alone, rtol=1e-4, atol=1e-4)
    assert not np.allclose(alone[0][0], alone[1][0]), "different inputs must give different outputs"


@pytest.mark.skipif(not runtime_available("openvino"), reason="openvino is not installed")
def test_an_openvino_model_is_compiled_once_for_throughput(tmp_path: Path, model_weights: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import openvino as ov  # type: ignore[import-untyped]

    if not model_weights.endswith(".pt"):
        pytest.skip("needs the bundled .pt model")
    config = ModelConfig(weights=model_weights, imgsz=160, runtime="openvino", export_dir=tmp_path)
    resolve_model(model_weights, "openvino", "cpu", 160, 2, False, tmp_path)
    hints: list[object] = []
    compile_model = ov.Core.compile_model

    def recording_compile(self: object, model: object, device: object = None, config: object = None) -> object:
        hints.append((config or {}).get("PERFORMANCE_HINT") if isinstance(config, dict) else None)
        return compile_model(self, model, device, config) if config is not None else compile_model(self, model, device)

    monkeypatch.setattr(ov.Core, "compile_model", recording_compile)
    detector = UltralyticsDetector(config, "cpu", 2)
    detector.warmup([1, 2])
    frames = [replace(make_frame("s", i), image=image)
              for i, (image, _) in enumerate(render_scene(SceneSpec(width=320, height=180, n_frames=2, seed=5)))]
    assert len(infer(detector, frames)) == 2
    assert hints == ["THROUGHPUT"], "the export must be compiled once, by the request pool, not by Ultralytics too"


def test_the_cache_key_changes_with_the_ultralytics_and_runtime_versions_and_the_gpu_generation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    import ultralytics

    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights")
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.0.1"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))

    def engine() -> Path:
        return export_path(str(weights), "tensorrt", "cuda:0", 320, 4, True, tmp_path)

    paths = [engine()]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    paths.append(engine())
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.1.0"))
    paths.append(engine())
    monkeypatch.setattr(ultralytics, "__version__", "99.0.0")
    paths.append(engine())
    assert len(set(paths)) == len(paths), paths
    assert paths[-1] == engine(), "the same setup must find the same export"


@pytest.mark.skipif(not runtime_available("openvino"), reason="openvino is not installed")
def test_a_cached_export_that_does_not_load_is_discarded_and_the_model_runs_on_pytorch(
        tmp_path: Path, model_weights: str, caplog: pytest.LogCaptureFixture) -> None:
    if not model_weights.endswith(".pt"):
        pytest.skip("needs the bundled .pt model")
    target = export_path(model_weights, "openvino", "cpu", 160, 2, False, tmp_path)
    target.mkdir(parents=True)
    (target / f"{Path(model_weights).stem}.xml").write_text('<?xml version="1.0"?>\n<net name="main" vers')
    (target / f"{Path(model_weights).stem}.bin").write_bytes(b"")
    (target / "metadata.yaml").write_text("stride: 32\ntask: segment\nbatch: 2\nimgsz: [160, 160]\n")
    detector = UltralyticsDetector(ModelConfig(weights=model_weights, imgsz=160, runtime="openvino",
                                               export_dir=tmp_path), "cpu", 2)
    assert detector.runtime == "openvino", "the corrupt export is found where a good one would be"
    with caplog.at_level(logging.WARNING, logger="pipeline.inference.detector"):
        detector.warmup([1, 2])
    assert detector.runtime == "torch"
    assert any("does not load" in record.getMessage() for record in caplog.records
               if record.name == "pipeline.inference.detector" and record.levelno == logging.WARNING)
    assert not target.parent.exists(), "the next start must export afresh"
    frames = [replace(make_frame("s", i), image=image)
              for i, (image, _) in enumerate(render_scene(SceneSpec(width=320, height=180, n_frames=2, seed=5)))]
    assert len(infer(detector, frames)) == 2


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0
