"""Replaying the model's forward pass as CUDA graphs.

A YOLO forward pass is a few hundred small kernel launches, and each launch is a Python call that needs
the GIL. With the stream readers, the publisher and the Kafka client busy on the same host, the launches
rather than the GPU set the pace: a batch that the GPU runs in 8 ms took 30 ms or more. A captured graph
launches the whole pass in one call.

A graph is fixed to one input shape, so batches are padded up to the next captured batch size (powers of
two up to `max_batch`, and `max_batch` itself); the padding rows cost a little GPU time, which is cheap
next to the launches saved. All graphs share one memory pool: they run one after another on one stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_MAX_GRAPHS = 24
_WARMUP_RUNS = 2


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes that get a graph: powers of two below `max_batch`, and `max_batch` itself."""
    sizes = []
    size = 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch]


@dataclass
class _Graph:
    graph: Any
    static_input: torch.Tensor
    static_output: Any
    # Tensors the model keeps between calls (such as a detection head's anchors) are baked into the graph
    # by address; holding them keeps that memory from being reused when the model recomputes them.
    kept_alive: list[Any] = field(default_factory=list)


class GraphedForward:
    """Calls `forward` through a CUDA graph per (bucket size, input shape), capturing on first use.

    Outputs of a replay live in the graph's static memory until the next replay, so the caller queues
    everything that reads them before it calls again (the detector's NMS does, on the same stream).
    If a capture fails, the model runs eagerly from then on.
    """

    def __init__(self, forward: Callable[[torch.Tensor], Any], model: Any, max_batch: int) -> None:
        self._forward = forward
        self._model = model
        self._buckets = batch_buckets(max_batch)
        self._graphs: dict[tuple[int, ...], _Graph] = {}
        self._pool: Any = None
        self._streams: dict[torch.device, Any] = {}
        self.enabled = True

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def __call__(self, batch: torch.Tensor) -> Any:
        import torch

        rows = int(batch.shape[0])
        bucket = next((size for size in self._buckets if size >= rows), None)
        if not self.enabled or bucket is None:
            return self._forward(batch)
        key = (bucket, *batch.shape[1:])
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= _MAX_GRAPHS:
                return self._forward(batch)
            entry = self._capture(key, batch)
            if entry is None:
                return self._forward(batch)
        with torch.cuda.device(batch.device):  # a graph replays on the current device's stream
            entry.static_input[:rows].copy_(batch)
            entry.graph.replay()
        return _first_rows(entry.static_output, rows, bucket)

    def _capture(self, key: tuple[int, ...], batch: torch.Tensor) -> _Graph | None:
        import torch

        static_input = torch.zeros(key, dtype=batch.dtype, device=batch.device)
        static_input[: batch.shape[0]].copy_(batch)
        try:
            with torch.cuda.device(batch.device):
                return self._capture_on_device(key, static_input)
        except Exception:  # a model that cannot be captured still runs, only slower
            log.warning("CUDA graph capture failed for input %s; running the model eagerly", key, exc_info=True)
            self.enabled = False
            return None

    def _capture_on_device(self, key: tuple[int, ...], static_input: torch.Tensor) -> _Graph:
        import torch

        device = static_input.device
        # Warm-up and capture on one stream of this device, as torch's make_graphed_callables does. Without
        # `stream=`, torch.cuda.graph captures on one process-wide stream made on whichever device captured
        # first; a capture for another device then records nothing, and its replays return stale output.
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(_WARMUP_RUNS):
                self._forward(static_input)
        torch.cuda.current_stream(device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
            static_output = self._forward(static_input)
        entry = _Graph(graph, static_input, static_output, _model_state_tensors(self._model))
        self._graphs[key] = entry
        log.debug("captured a CUDA graph for input %s", key)
        return entry


def _model_state_tensors(model: Any) -> list[Any]:
    import torch

    kept: list[Any] = []
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor):
                kept.append(value)
            elif isinstance(value, (list, tuple)):
                kept.extend(item for item in value if isinstance(item, torch.Tensor))
    return kept


def _first_rows(output: Any, rows: int, bucket: int) -> Any:
    """The real batch's part of a padded output: views of every per-image tensor in the output tree."""
    import torch

    if rows == bucket:
        return output
    if isinstance(output, torch.Tensor):
        return output[:rows] if output.dim() and output.shape[0] == bucket else output
    if isinstance(output, tuple):
        return tuple(_first_rows(item, rows, bucket) for item in output)
    if isinstance(output, list):
        return [_first_rows(item, rows, bucket) for item in output]
    return output
