"""Decoding files on the GPU: the source's contract, with a stand-in for PyNvVideoCodec (no GPU here).

The stand-in behaves as NVDEC does where it matters to the source: it holds frames back for reordering
until an empty packet drains them, and hands out RGB frames through DLPack. The real decoder is checked
on a GPU box by the benchmark (`vap bench --decoder cuda:0`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.analytics.zones import StreamAnalytics
from pipeline.app import Pipeline
from pipeline.config import AnalyticsConfig, SnapshotConfig, StreamConfig, parse_config
from pipeline.errors import ConfigError
from pipeline.frames import Detections, FrameResult, Image, host_image
from pipeline.inference.preprocess import DeviceLetterbox, HostLetterbox, plan_batch
from pipeline.publishing.snapshots import SnapshotWriter
from pipeline.sources.nvdec import NvdecSource, gpu_index
from pipeline.sources.source import InvalidFrame
from tests.fakes import scene_frames


class FakeDecoder:
    def __init__(self, frames: list[torch.Tensor], held_back: int, corrupt: frozenset[int] = frozenset()) -> None:
        self._frames = frames
        self._held_back = held_back
        self._corrupt = corrupt
        self._received = 0
        self._returned = 0

    def Decode(self, packet: Any) -> list[torch.Tensor]:
        if packet in self._corrupt:
            self._received += 1
            self._returned += 1
            raise RuntimeError(f"packet {packet} is corrupt")
        if packet is None:
            end = self._received
        else:
            self._received += 1
            end = max(self._returned, self._received - self._held_back)
        out = self._frames[self._returned:end]
        self._returned = end
        return out


class FakeCodec:
    """Just enough of PyNvVideoCodec: a demuxer that yields packets and a decoder that reorders."""

    class OutputColorType:
        RGB = "rgb"

    def __init__(self, frames: list[torch.Tensor], fps: float = 25.0, held_back: int = 2,
                 fail_open: bool = False, corrupt: frozenset[int] = frozenset()) -> None:
        self.frames = frames
        self.fps = fps
        self.held_back = held_back
        self.fail_open = fail_open
        self.corrupt = corrupt
        self.decoders: list[dict[str, Any]] = []

    def CreateDemuxer(self, filename: str) -> Any:
        if self.fail_open:
            raise RuntimeError(f"cannot open {filename}")
        codec = self

        class Demuxer:
            def GetNvCodecId(self) -> str:
                return "h264"

            def FrameRate(self) -> float:
                return codec.fps

            def __iter__(self) -> Iterator[int]:
                return iter(range(len(codec.frames)))

        return Demuxer()

    def CreateDecoder(self, **options: Any) -> FakeDecoder:
        self.decoders.append(options)
        return FakeDecoder(self.frames, self.held_back, self.corrupt)

    def PacketData(self) -> None:
        return None


def rgb_frames(count: int) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(host_image(frame.image)[..., ::-1]))
            for frame in scene_frames(160, 96, count, seed=3)]


def file_stream(tmp_path: Path, decoder: str = "cuda:1") -> StreamConfig:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    return parse_config({"streams": [{"id": "a", "url": str(clip), "decoder": decoder}]}).streams[0]


def test_every_frame_comes_out_in_order_as_bgr_including_those_held_back_for_reordering(tmp_path: Path) -> None:
    frames = rgb_frames(7)
    codec = FakeCodec(frames, fps=20.0, held_back=3)
    source = NvdecSource(file_stream(tmp_path), codec_module=codec)
    assert source.open()
    assert codec.decoders[0]["gpuid"] == 1 and codec.decoders[0]["outputColorType"] == "rgb"
    assert source.frame_rate() == 20.0
    decoded, positions = [], []
    while (image := source.read()) is not None:
        decoded.append(image)
        positions.append(source.position_ms())
    assert len(decoded) == len(frames)
    for got, rgb in zip(decoded, frames, strict=True):
        assert torch.equal(got, rgb.flip(2))
    assert positions == [0.0, 50.0, 100.0, 150.0, 200.0, 250.0, 300.0]
    assert source.read() is None
    source.close()


def test_a_corrupt_packet_costs_its_frame_and_decoding_goes_on(tmp_path: Path) -> None:
    frames = rgb_frames(6)
    source = NvdecSource(file_stream(tmp_path), codec_module=FakeCodec(frames, held_back=0, corrupt=frozenset({2})))
    assert source.open()
    decoded, invalid = [], 0
    while True:
        try:
            image = source.read()
        except InvalidFrame:
            invalid += 1
            continue
        if image is None:
            break
        decoded.append(image)
    assert invalid == 1
    assert len(decoded) == 5
    for got, rgb in zip(decoded, frames[:2] + frames[3:], strict=True):
        assert torch.equal(got, rgb.flip(2))


def test_a_file_the_decoder_cannot_open_is_reported_as_not_opened(tmp_path: Path) -> None:
    source = NvdecSource(file_stream(tmp_path), codec_module=FakeCodec([], fail_open=True))
    assert not source.open()
    assert source.read() is None


def test_gpu_decoded_frames_letterbox_as_host_frames_do() -> None:
    images = [host_image(frame.image) for frame in scene_frames(640, 360, 3, seed=8)]
    tensors = [torch.from_numpy(image.copy()) for image in images]
    plan = plan_batch(images, 320, 32, rect=True)
    assert plan_batch(tensors, 320, 32, rect=True) == plan
    for letterbox in (DeviceLetterbox("cpu", copy_threads=1), HostLetterbox()):
        torch.testing.assert_close(letterbox(tensors, plan, torch.float32), letterbox(images, plan, torch.float32),
                                   atol=0, rtol=0)
    mixed: list[Image] = [tensors[0], images[1], tensors[2]]
    torch.testing.assert_close(DeviceLetterbox("cpu")(mixed, plan, torch.float32),
                               DeviceLetterbox("cpu")(images, plan, torch.float32), atol=0, rtol=0)


@pytest.mark.parametrize(("stream", "path", "message"), [
    ({"id": "a", "url": "rtsp://192.0.2.1/s", "decoder": "cuda"}, "streams[0]", "reads files only"),
    ({"id": "a", "url": "0", "decoder": "cuda:0"}, "streams[0]", "reads files only"),
    ({"id": "a", "url": "clip.mp4", "decoder": "gpu"}, "streams[0].decoder", "should match pattern"),
])
def test_gpu_decoding_is_refused_where_it_cannot_work(stream: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config({"streams": [stream]})
    assert error.value.problems[0][0] == path
    assert message in error.value.problems[0][1]


def test_gpu_decoding_without_its_package_fails_at_start_with_what_to_install(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipeline.app.nvdec_available", lambda: False)
    pipeline = Pipeline(parse_config({"streams": [file_stream(tmp_path, "cuda").model_dump()],
                                      "http": {"host": "127.0.0.1", "port": 0}}))
    with pytest.raises(ValueError, match=r"PyNvVideoCodec.*decoder: cpu"):
        pipeline.add_stream(file_stream(tmp_path, "cuda"))


def test_gpu_index() -> None:
    assert gpu_index("cuda") == 0 and gpu_index("cuda:3") == 3


class NotOnHost(torch.Tensor):
    """Stands in for a CUDA tensor: NumPy cannot read it without an explicit copy to the host."""

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("can't convert a device tensor to numpy; copy it to the host first")


def on_device(image: np.ndarray) -> torch.Tensor:
    return torch.Tensor._make_subclass(NotOnHost, torch.from_numpy(image.copy()))


@pytest.mark.parametrize("tracker", ["bytetrack", "botsort"])
def test_frames_decoded_on_a_gpu_work_wherever_pixels_are_read(tmp_path: Path, tracker: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshots and trackers get the same answers from a device tensor as from the host image (BoT-SORT's
    motion compensation would otherwise fail on every frame, which it only logs)."""
    from ultralytics.trackers.utils.gmc import GMC

    motion_inputs: list[type] = []
    original_apply = GMC.apply

    def recording_apply(self: Any, raw_frame: Any, detections: Any = None) -> Any:
        motion_inputs.append(type(raw_frame))
        return original_apply(self, raw_frame, detections)

    monkeypatch.setattr(GMC, "apply", recording_apply)
    boxes = [np.array([[10 + 6 * i, 20, 50 + 6 * i, 60], [120, 30, 150, 70]], np.float32) for i in range(6)]
    outcomes = []
    for as_tensor in (False, True):
        analytics = StreamAnalytics("a", AnalyticsConfig(tracking=True), tracker, {0: "shape"})
        writer = SnapshotWriter(SnapshotConfig(dir=tmp_path / str(as_tensor), every_n_frames=1))
        tracks, jpegs = [], []
        for frame_id, (frame, found) in enumerate(zip(scene_frames(200, 120, 6, seed=5), boxes, strict=True)):
            image = host_image(frame.image)
            frame = replace(frame, frame_id=frame_id, image=on_device(image) if as_tensor else image)
            detections = Detections(boxes_xyxy=found, confidences=np.full(2, 0.9, np.float32),
                                    class_ids=np.zeros(2, np.int64))
            result, _ = analytics.process(FrameResult(frame=frame, task="detect", detections=detections,
                                                      labels={0: "shape"}))
            tracks.append(result.detections.track_ids)
            uri = writer.write(result)
            assert uri is not None
            jpegs.append(Path(uri.removeprefix("file://")).read_bytes())
        outcomes.append((tracks, jpegs))
    assert outcomes[0] == outcomes[1]
    assert any(track is not None for frame_tracks in outcomes[0][0] for track in frame_tracks)
    assert set(motion_inputs) <= {np.ndarray}
    assert bool(motion_inputs) == (tracker == "botsort")
