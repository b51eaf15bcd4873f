"""Which devices run the model, and which worker infers a stream decoded on a GPU."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def resolve_devices(requested: str | list[str]) -> list[str]:
    """Every device that gets a worker: each CUDA GPU for `auto` when there is one, else the CPU."""
    import torch

    names = [_canonical_device(name) for name in ([requested] if isinstance(requested, str) else requested)]
    if names == ["auto"]:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{index}" for index in range(count)] or ["cpu"]
    for name in names:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"model.device is {name} but no CUDA device is available; use 'cpu' or 'auto'")
    return names


def worker_for_decoder(decoder: str, worker_devices: list[str]) -> int | None:
    """The worker on the GPU that decodes a stream, so its frames never cross between devices; None for a stream
    decoded on the CPU, or on a GPU no worker runs on (its frames are then copied over)."""
    if decoder == "cpu":
        return None
    device = _canonical_device(decoder)
    return worker_devices.index(device) if device in worker_devices else None


def _canonical_device(name: str) -> str:
    """`0` and `cuda` mean `cuda:0`, as in Ultralytics; one spelling keeps metric labels and checks simple."""
    if name.isdigit():
        return f"cuda:{name}"
    return "cuda:0" if name == "cuda" else name


def resolve_device(requested: str | list[str]) -> str:
    """The first device `resolve_devices` picks; for single-device tools such as the benchmark."""
    return resolve_devices(requested)[0]


def use_device_in_this_thread(device: str) -> None:
    """Makes `device` the calling thread's current CUDA device. The current device is per thread and
    starts at cuda:0 in every new one; what depends on it rather than on a tensor's device (a TensorRT
    execution context, indexless `cuda` calls) would otherwise run against the wrong GPU, failing with
    "invalid resource handle" on any but cuda:0."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(torch.device(device))
