"""CUDA graph replay of the forward pass: padding to captured sizes, and the same answers as eager."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.inference.cudagraphs import GraphedForward, _first_rows, batch_buckets
from pipeline.inference.detector import UltralyticsDetector, infer
from tests.fakes import scene_frames


def test_buckets_are_powers_of_two_then_the_largest_batch() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]


def test_padded_output_keeps_only_the_real_rows_of_every_per_image_tensor() -> None:
    detections = torch.arange(8 * 3).reshape(8, 3)
    protos = torch.ones(8, 2, 4, 4)
    shared = torch.zeros(5)
    out = _first_rows((detections, [protos, shared]), rows=3, bucket=8)
    assert torch.equal(out[0], detections[:3])
    assert out[1][0].shape == (3, 2, 4, 4)
    assert out[1][1] is shared


def test_batches_larger_than_every_bucket_run_eagerly() -> None:
    calls: list[int] = []

    def forward(batch: torch.Tensor) -> torch.Tensor:
        calls.append(int(batch.shape[0]))
        return batch * 2

    graphed = GraphedForward(forward, torch.nn.Identity(), max_batch=4)
    assert torch.equal(graphed(torch.ones(6, 3)), torch.full((6, 3), 2.0))
    assert calls == [6] and graphed.captured == 0


class FakeStream:
    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device  # None: the current device, whichever that is

    def wait_stream(self, other: FakeStream) -> None:
        pass


class FakeGraph:
    def replay(self) -> None:
        pass


def test_each_device_captures_on_a_stream_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Left to itself, torch.cuda.graph captures every device's graph on one stream made on the first device
    that captured; on another device that records an empty graph. Two tensor devices stand in for two GPUs."""
    capture_streams: list[Any] = []

    def graph(cuda_graph: FakeGraph, pool: Any = None, stream: Any = None, **options: Any) -> Any:
        capture_streams.append(stream)
        return contextlib.nullcontext()

    for name, fake in (("Stream", FakeStream), ("current_stream", FakeStream), ("CUDAGraph", FakeGraph),
                       ("graph", graph), ("graph_pool_handle", object), ("stream", contextlib.nullcontext),
                       ("device", contextlib.nullcontext)):
        monkeypatch.setattr(torch.cuda, name, fake)
    devices = [torch.device("cpu"), torch.device("meta")]
    for device in devices:
        graphed = GraphedForward(lambda batch: batch * 2, torch.nn.Identity(), max_batch=4)
        graphed(torch.ones(1, 3, device=device))
        graphed(torch.ones(3, 3, device=device))
        assert graphed.captured == 2
    assert all(isinstance(stream, FakeStream) for stream in capture_streams), capture_streams
    assert [stream.device for stream in capture_streams] == [devices[0]] * 2 + [devices[1]] * 2
    assert capture_streams[0] is capture_streams[1], "graphs sharing a memory pool capture on one stream"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_detector_answers_as_the_eager_one(model_weights: str) -> None:
    frames = scene_frames(640, 360, 5, seed=21)
    answers = {}
    for graphs in (False, True):
        config = ModelConfig(weights=model_weights, imgsz=320, conf=0.25, runtime="torch", cuda_graphs=graphs)
        detector = UltralyticsDetector(config, "cuda:0", max_batch=8)
        detector.warmup([1, 8])
        answers[graphs] = [infer(detector, frames[:count]) for count in (5, 3, 5)]
        if graphs:
            assert detector._graphed is not None and detector._graphed.captured >= 4
    found = 0
    for eager_batch, graphed_batch in zip(answers[False], answers[True], strict=True):
        for eager, graphed in zip(eager_batch, graphed_batch, strict=True):
            assert len(eager.detections.boxes_xyxy) == len(graphed.detections.boxes_xyxy)
            found += len(eager.detections.boxes_xyxy)
            torch.testing.assert_close(torch.from_numpy(graphed.detections.boxes_xyxy),
                                       torch.from_numpy(eager.detections.boxes_xyxy), atol=1.0, rtol=0)
    assert found > 0
