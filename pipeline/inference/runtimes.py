"""Faster runtimes through Ultralytics' export, cached on disk.

An export is keyed by the weights' content hash, input size, batch size, precision, device kind, format,
the Ultralytics and runtime versions and, for TensorRT, the GPU's compute capability, so a changed model,
setting, upgrade or GPU never reuses a stale export. Exports are written to a temporary folder and renamed
into place, so two processes starting at once cannot see a half-written one. An export that fails, or a
cached one that cannot be loaded (the detector then calls `discard`), falls back to PyTorch with a
warning: an optimisation never stops the pipeline.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import queue
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.inference.quantize import Int8Calibration, quantize_openvino

log = logging.getLogger(__name__)

_EXPORT_FORMATS = {"onnx": "onnx", "openvino": "openvino", "tensorrt": "engine"}
_EXPORT_SUFFIX = {"onnx": ".onnx", "openvino": "_openvino_model", "tensorrt": ".engine"}
_REQUEST_WAIT_S = 60.0  # only reached when whoever should finish the running requests has died
_RUNTIME_MODULES = {"onnx": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}


@dataclass(frozen=True)
class ResolvedModel:
    """The weights to load and the runtime they run on; `cache_dir` holds an export, and only it."""

    path: str
    runtime: str
    cache_dir: Path | None = None


def default_export_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vap" / "exports"


def runtime_available(runtime: str) -> bool:
    module = _RUNTIME_MODULES.get(runtime)
    return module is None or importlib.util.find_spec(module) is not None


def choose_runtime(requested: str, device: str) -> str:
    """`auto`: TensorRT on CUDA, OpenVINO on CPU, when installed; PyTorch otherwise."""
    if requested != "auto":
        return requested
    preferred = "tensorrt" if device.startswith("cuda") else "openvino"
    return preferred if runtime_available(preferred) else "torch"


def _weights_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _toolchain(runtime: str, device: str) -> str:
    """What else an export depends on: a newer Ultralytics or runtime may not read an older export (or
    reads it differently), and a TensorRT engine runs only on the GPU generation it was built for."""
    import ultralytics

    module = importlib.import_module(_RUNTIME_MODULES[runtime])
    parts = [f"ultralytics={ultralytics.__version__}", f"{runtime}={getattr(module, '__version__', 'unknown')}"]
    if runtime == "tensorrt" and device.startswith("cuda"):
        import torch

        major, minor = torch.cuda.get_device_capability(device)
        parts.append(f"sm={major}.{minor}")
    return hashlib.sha256(";".join(parts).encode()).hexdigest()[:8]


def export_path(weights: str, runtime: str, device: str, imgsz: int, batch: int, half: bool, export_dir: Path,
                int8_key: str | None = None) -> Path:
    """Where the export of `weights` for these settings lives in the cache, whether or not it exists yet; an INT8
    model's key names its calibration data too."""
    source = Path(weights)
    precision = f"int8-{int8_key}" if int8_key else "fp16" if half else "fp32"
    device_kind = "cuda" if device.startswith("cuda") else "cpu"
    key = (f"{source.stem}-{_weights_hash(source)}-{imgsz}px-b{batch}-{precision}-{device_kind}"
           f"-{_toolchain(runtime, device)}")
    return export_dir / runtime / key / f"{source.stem}{_EXPORT_SUFFIX[runtime]}"


def resolve_model(
    weights: str, requested_runtime: str, device: str, imgsz: int, batch: int, half: bool, export_dir: Path,
    int8: Int8Calibration | None = None,
) -> ResolvedModel:
    """Export `weights` for the chosen runtime (once), or return them as they are for PyTorch. With `int8`, the
    OpenVINO export is quantized (once per calibration); that never falls back to another precision."""
    if int8 is not None:
        return _resolve_int8(weights, requested_runtime, device, imgsz, batch, export_dir, int8)
    runtime = choose_runtime(requested_runtime, device)
    source = Path(weights)
    if runtime == "torch" or source.suffix != ".pt" or not source.is_file():
        return ResolvedModel(weights, "torch")
    if not runtime_available(runtime):
        log.warning("model.runtime %s needs the '%s' package; running on PyTorch", runtime, _RUNTIME_MODULES[runtime])
        return ResolvedModel(weights, "torch")
    target = export_path(weights, runtime, device, imgsz, batch, half, export_dir)
    if target.exists():
        return ResolvedModel(str(target), runtime, target.parent)
    try:
        _export(source, runtime, device, imgsz, batch, half, target)
    except Exception as error:
        log.warning("exporting %s to %s failed (%s); running on PyTorch", source.name, runtime, error)
        return ResolvedModel(weights, "torch")
    return ResolvedModel(str(target), runtime, target.parent)


def _resolve_int8(weights: str, requested_runtime: str, device: str, imgsz: int, batch: int, export_dir: Path,
                  int8: Int8Calibration) -> ResolvedModel:
    if choose_runtime(requested_runtime, device) != "openvino" or device != "cpu":
        raise RuntimeError("model.precision int8 needs OpenVINO on the CPU: install vap's openvino extra "
                           "(pip install 'vap[openvino]') or choose fp32")
    source = Path(weights)
    if source.suffix != ".pt" or not source.is_file():
        raise ConfigError([("model.precision", f"int8 quantizes a .pt weights file on this machine; "
                                               f"model.weights is {weights}")])
    fp32 = resolve_model(weights, "openvino", device, imgsz, batch, False, export_dir)
    if fp32.runtime != "openvino":
        raise RuntimeError("model.precision int8: the OpenVINO export it starts from failed (see the warning above)")
    target = export_path(weights, "openvino", device, imgsz, batch, False, export_dir, int8_key=int8.key)
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=target.parent.parent, prefix=".int8-") as scratch:
            staged = Path(scratch) / "staged"
            quantize_openvino(Path(fp32.path), int8, imgsz, staged / target.name)
            target.parent.parent.mkdir(parents=True, exist_ok=True)
            try:
                staged.rename(target.parent)
            except OSError:
                if not target.exists():
                    raise
    return ResolvedModel(str(target), "openvino", target.parent)


def discard(resolved: ResolvedModel) -> None:
    """Removes an export that failed to load, so the next start exports afresh rather than failing again."""
    if resolved.cache_dir is not None:
        shutil.rmtree(resolved.cache_dir, ignore_errors=True)


def _export(source: Path, runtime: str, device: str, imgsz: int, batch: int, half: bool, target: Path) -> None:
    from ultralytics import YOLO

    log.info("exporting %s to %s for %s at %d px, batch %d (first run only; cached in %s)", source.name, runtime,
             device, imgsz, batch, target.parent)
    started = time.monotonic()
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent.parent, prefix=".export-") as scratch:
        copy = Path(scratch) / source.name
        shutil.copyfile(source, copy)
        exported = YOLO(str(copy)).export(
            format=_EXPORT_FORMATS[runtime], imgsz=imgsz, batch=batch, dynamic=True, half=half, device=device,
            verbose=False,
        )
        staged = Path(scratch) / "staged"
        staged.mkdir()
        Path(exported).rename(staged / target.name)
        try:
            staged.rename(target.parent)
        except OSError:
            if not target.exists():
                raise
    log.info("export to %s done in %.1f s", runtime, time.monotonic() - started)


class OpenVinoRequests:
    """An exported OpenVINO model compiled for throughput, with a pool of inference requests.

    Ultralytics compiles for latency: one request at a time spreads each batch over every core, and
    small models keep the cores only partly busy. Compiled for throughput, OpenVINO runs one request per
    CPU stream at once (measured on 2 cores at batch 4: about 210 frames/s against 160). `start` takes a
    free request and returns at once; `finish` waits for it and returns it to the pool, so a caller that
    starts a batch while the previous one is still running keeps every stream busy. The export's metadata
    gives what Ultralytics' own backend would (stride, dynamic shapes, built-in NMS), so the model is
    compiled once, here.

    The model takes the letterboxed batch as it is, uint8 BGR in NHWC: the conversion to float RGB in NCHW
    scaled to 0-1 is compiled into it, where OpenVINO's own kernels do it beside the first layer. On the
    host, that reorder, conversion and division plus copying four times the bytes into the request cost
    about a millisecond a batch of 4 at 320 px.
    """

    def __init__(self, model_dir: str) -> None:
        import openvino as ov  # type: ignore[import-untyped]
        import yaml
        from openvino.preprocess import ColorFormat, PrePostProcessor  # type: ignore[import-untyped]

        core = ov.Core()
        path = Path(model_dir)
        xml = path if path.is_file() else next(path.glob("*.xml"))
        metadata = yaml.safe_load((xml.parent / "metadata.yaml").read_text(encoding="utf-8"))
        self.stride = int(metadata["stride"])
        self.dynamic = bool((metadata.get("args") or {}).get("dynamic", False))
        self.end2end = bool(metadata.get("end2end", False))
        steps = PrePostProcessor(core.read_model(xml))
        steps.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")).set_color_format(
            ColorFormat.BGR)
        steps.input().model().set_layout(ov.Layout("NCHW"))
        steps.input().preprocess().convert_element_type(ov.Type.f32).convert_color(ColorFormat.RGB).scale(255.0)
        self._compiled = core.compile_model(steps.build(), "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"})
        self.size = max(1, int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._outputs = len(self._compiled.outputs)
        self._free: queue.Queue[Any] = queue.Queue()
        for _ in range(self.size):
            self._free.put(self._compiled.create_infer_request())

    def start(self, batch: Any) -> Any:
        """Queues `batch` (uint8 BGR, NHWC, as letterboxed) on a free request, waiting for one when all are
        busy. The request keeps its own copy: the caller may reuse `batch` at once."""
        request = self._free.get(timeout=_REQUEST_WAIT_S)
        try:
            request.start_async({0: batch})
        except Exception:
            self._free.put(request)
            raise
        return request

    def finish(self, request: Any) -> list[Any]:
        """The request's outputs, in the model's output order, copied out of the reusable request."""
        return self.finish_timed(request)[0]

    def finish_timed(self, request: Any) -> tuple[list[Any], float]:
        """The outputs and the seconds the model itself ran (OpenVINO's own measure, without the wait for a
        free request or for the caller to come back)."""
        try:
            request.wait()
            outputs = [np.copy(request.get_output_tensor(index).data) for index in range(self._outputs)]
            return outputs, float(request.latency) / 1000
        finally:
            self._free.put(request)
