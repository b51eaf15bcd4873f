"""The configuration tree: one pydantic model, with every default and bound in one place.

Validation is pure (no network, no hardware probe, no file opened besides the config itself) so that
`vap validate` gives the same answer on a laptop as on the camera box.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pipeline.errors import ConfigError

STREAM_ID_PATTERN = r"^[A-Za-z0-9._-]+$"
_LIVE_SCHEMES = ("rtsp", "rtsps", "http", "https")
# `$${` is an escaped literal `${`; a `${` that is neither is a malformed reference.
_ENV_TOKEN = re.compile(r"\$\$\{|\$\{(?:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})?")
_WHOLE_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_YAML_NULLS = ("", "~", "null", "Null", "NULL")
_STR_TAG, _NULL_TAG, _MERGE_TAG = "tag:yaml.org,2002:str", "tag:yaml.org,2002:null", "tag:yaml.org,2002:merge"
_SCHEME_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/*")
_HOST_AND_PORT = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%-]+)(?::\d*)?(?=[/?#]|$)")
_SECRET_QUERY_VALUE = re.compile(
    r"(?i)([?&;][a-z0-9_.-]*(?:pass|pwd|pw|token|secret|key|auth|sig)[a-z0-9_.-]*=)[^&;#]*"
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _error_at(location: tuple[int | str, ...], message: str) -> PydanticCustomError:
    """An error about one item inside the value a validator checks, so the key path names that item
    (`zones[1].id`), not the whole list; `parse_config` appends `location` to pydantic's own."""
    return PydanticCustomError("config_item", "{message}", {"message": message, "at": location})


def _number_as_text(value: Any) -> Any:
    """Ids like `123` are valid ids; YAML reads them as numbers, so give them back as text."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def redact_url(url: str) -> str:
    """`url` with its user info and secret-looking query values replaced by `***`.

    Passwords often hold unencoded `#?/@:`, which defeats a URL parser; so the user info is everything
    between `scheme://` and the last `@` that is followed by a host, erring towards masking too much.
    """
    prefix = _SCHEME_PREFIX.match(url)
    if prefix is None or prefix.group(1).lower() == "file":
        return url
    rest = url[prefix.end() :]
    ats = [index for index, char in enumerate(rest) if char == "@"]
    if ats:
        at = next((index for index in reversed(ats) if _HOST_AND_PORT.match(rest, index + 1)), ats[-1])
        rest = "***" + rest[at:]
    return prefix.group(0) + _SECRET_QUERY_VALUE.sub(r"\1***", rest)


Point = tuple[float, float]
# inf or nan would make every point-in-polygon and side-of-line test false, silently.
_Coordinate = Annotated[float, Field(allow_inf_nan=False)]
_ConfigPoint = tuple[_Coordinate, _Coordinate]
Anchor = Literal["bottom_center", "center", "top_center", "left_center", "right_center"]


def _some_classes(value: list[int | str] | None) -> list[int | str] | None:
    """An empty class list would silently keep (or count) nothing at all."""
    if value is not None and not value:
        raise ValueError("an empty list keeps no class at all; omit it or use null to keep every class")
    return value


class ZoneConfig(_Section):
    """A polygon; a tracked object is inside when its anchor point is."""

    id: Annotated[str, BeforeValidator(_number_as_text), Field(pattern=STREAM_ID_PATTERN, max_length=64)]
    polygon: list[_ConfigPoint] = Field(min_length=3, description="Vertices in pixels, or 0..1 with normalized: true")
    classes: list[int | str] | None = Field(None, description="Class ids or labels counted; default all")
    dwell_s: float | None = Field(None, gt=0, description="Emit a dwell event once an object stays this long")

    _some_classes = field_validator("classes")(_some_classes)


class LineConfig(_Section):
    """A segment from `start` to `end`. Facing from start to end as drawn on the image, an object crossing
    to the right-hand side gets the first direction name, one crossing to the left-hand side the second."""

    id: Annotated[str, BeforeValidator(_number_as_text), Field(pattern=STREAM_ID_PATTERN, max_length=64)]
    start: _ConfigPoint
    end: _ConfigPoint
    classes: list[int | str] | None = None
    directions: tuple[str, str] = Field(("in", "out"), description="Names for crossing to the right and to the left")

    _some_classes = field_validator("classes")(_some_classes)

    @field_validator("directions")
    @classmethod
    def _directions_differ(cls, value: tuple[str, str]) -> tuple[str, str]:
        if value[0] == value[1]:
            raise ValueError(f"both directions are named '{value[0]}', so events could not tell which way an "
                             "object crossed; give them two different names")
        return value

    @model_validator(mode="after")
    def _has_length(self) -> LineConfig:
        if self.start == self.end:
            raise _error_at(("end",), f"is the same point as start {list(self.start)}; a line needs two different "
                                      "points")
        return self


class AnalyticsConfig(_Section):
    """Per-stream tracking, zones and lines; tracking turns on when there is a zone or line."""

    tracking: bool = Field(False, description="Track objects (fills track_id) even without zones or lines")
    normalized: bool = Field(False, description="Coordinates are fractions of the frame size, not pixels")
    anchor: Anchor = Field("bottom_center", description="The point of a box tested against zones and lines")
    zones: list[ZoneConfig] = []
    lines: list[LineConfig] = []

    @field_validator("zones", "lines")
    @classmethod
    def _unique_ids(
        cls, items: Sequence[ZoneConfig | LineConfig], info: ValidationInfo
    ) -> Sequence[ZoneConfig | LineConfig]:
        """Events, occupancy and a track's state are keyed by id: two zones with one id would make each
        undo the other, an exit and an enter on every frame."""
        kind = "zone" if info.field_name == "zones" else "line"
        first_index: dict[str, int] = {}
        for index, item in enumerate(items):
            if item.id in first_index:
                raise _error_at((index, "id"), f"duplicate {kind} id '{item.id}' ({info.field_name}"
                                               f"[{first_index[item.id]}] has it too); give each {kind} its own id")
            first_index[item.id] = index
        return items

    @model_validator(mode="after")
    def _normalized_within_the_frame(self) -> AnalyticsConfig:
        if not self.normalized:
            return self
        points: list[tuple[tuple[int | str, ...], Point]] = [
            (("zones", zone_index, "polygon", point_index), point)
            for zone_index, zone in enumerate(self.zones) for point_index, point in enumerate(zone.polygon)
        ]
        points += [(("lines", index, end), getattr(line, end)) for index, line in enumerate(self.lines)
                   for end in ("start", "end")]
        # A point a little past the edge is fine (a line drawn from edge to edge); one far past it is pixels.
        for location, (x, y) in points:
            if not (-1 <= x <= 2 and -1 <= y <= 2):
                raise _error_at(location, f"[{x:g}, {y:g}] is far outside the frame: with normalized: true "
                                          "coordinates are fractions from 0 to 1 (or set normalized: false for pixels)")
        return self

    @property
    def tracks(self) -> bool:
        return self.tracking or bool(self.zones) or bool(self.lines)


class StreamConfig(_Section):
    id: Annotated[
        str,
        BeforeValidator(_number_as_text),
        Field(pattern=STREAM_ID_PATTERN, max_length=128, description="Unique id; the Kafka key"),
    ]
    url: str = Field(description="rtsp://, http(s)://, a file path, /dev/videoN or a camera index")
    fps: float | None = Field(None, gt=0, le=1000, description="Cap: frames above this rate are dropped")
    transport: Literal["tcp", "udp"] = Field("tcp", description="RTSP transport")
    loop: bool = Field(False, description="Files only: start again at the end")
    realtime: bool = Field(True, description="Files only: pace at the file's frame rate")
    open_timeout_ms: int = Field(5000, ge=100, le=120_000, description="Give up opening after this")
    stall_timeout_s: float = Field(
        5.0, ge=0.1, le=600, description="No frame for this long means the stream is lost: reconnect"
    )
    max_staleness_ms: float | None = Field(
        2000, gt=0, description="Live streams: a frame older than this when batched is dropped as stale"
    )
    reconnect_backoff_s: float = Field(0.5, gt=0, le=60, description="First wait before reconnecting")
    reconnect_backoff_max_s: float = Field(10.0, gt=0, le=600, description="Longest wait between tries")
    decoder: str = Field(
        "cpu", pattern=r"^(cpu|cuda(:\d+)?)$",
        description="Files only: cpu (OpenCV), or cuda / cuda:N to decode on that GPU's video engine (NVDEC)",
    )
    analytics: AnalyticsConfig = AnalyticsConfig()

    @field_validator("id")
    @classmethod
    def _not_a_folder_step(cls, value: str) -> str:
        if value in (".", ".."):
            raise ValueError(f"'{value}' cannot be a stream id: it names a folder where snapshots are written")
        return value

    @field_validator("url", mode="before")
    @classmethod
    def _url_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("url")
    @classmethod
    def _known_source_kind(cls, url: str) -> str:
        if not url.strip():
            raise ValueError("must not be empty")
        scheme = urlsplit(url).scheme.lower()
        if "://" in url and scheme not in (*_LIVE_SCHEMES, "file"):
            raise ValueError(
                f"unsupported scheme '{scheme}://'; use rtsp://, http(s)://, a file path, /dev/videoN "
                "or a camera index"
            )
        return url

    @model_validator(mode="after")
    def _backoff_grows(self) -> StreamConfig:
        """A first wait above the longest would make every wait the longest: a typo, not a choice."""
        if self.reconnect_backoff_s > self.reconnect_backoff_max_s:
            raise _error_at(("reconnect_backoff_max_s",),
                            f"is {self.reconnect_backoff_max_s}, below reconnect_backoff_s "
                            f"({self.reconnect_backoff_s}); the longest wait cannot be shorter than the first")
        return self

    @model_validator(mode="after")
    def _gpu_decoding_reads_files(self) -> StreamConfig:
        if self.decoder != "cpu" and self.kind != "file":
            raise ValueError(f"decoder {self.decoder} reads files only; decode {self.kind} streams with cpu")
        return self

    @property
    def kind(self) -> Literal["live", "file", "camera"]:
        """Live network streams drop old frames; files wait; cameras are local live devices."""
        if self.url.isdigit() or self.url.startswith("/dev/video"):
            return "camera"
        if urlsplit(self.url).scheme.lower() in _LIVE_SCHEMES:
            return "live"
        return "file"

    @property
    def file_path(self) -> Path:
        return Path(self.url[len("file://") :] if self.url.startswith("file://") else self.url)

    @property
    def redacted_url(self) -> str:
        """The URL safe for logs and the API: credentials are replaced so they never reach a log line."""
        return redact_url(self.url)


class ModelConfig(_Section):
    weights: str = Field("yolo11n-seg.pt", description="Path or Ultralytics model name (or a .yaml)")
    task: Literal["auto", "detect", "segment", "classify"] = "auto"
    imgsz: int = Field(640, ge=32, le=4096, description="Model input size in pixels")
    device: str | list[str] = Field("auto", description="auto | cpu | cuda:N | a list of cuda devices")
    half: Literal["auto"] | bool = Field("auto", description="FP16; auto means on CUDA only (see model.precision)")
    precision: Literal["auto", "fp32", "fp16", "int8"] = Field(
        "auto", description="auto: as model.half says; int8: OpenVINO with NNCF post-training quantization, on the CPU"
    )
    calibration: Path | None = Field(
        None, description="int8: a folder of images or a video clip to calibrate on; default: the bundled model's "
                          "own set, else the first frames of the streams"
    )
    calibration_frames: int = Field(300, ge=8, le=10_000, description="int8: frames to calibrate on at most")
    conf: float = Field(0.25, ge=0.0, le=1.0)
    iou: float = Field(0.45, ge=0.0, le=1.0)
    classes: list[int | str] | None = Field(None, description="Class ids or names to keep")
    agnostic_nms: bool = Field(False, description="Suppress overlapping boxes across classes, not only within one")
    warmup: bool = Field(True, description="Run the real batch shapes once before reporting ready")
    cuda_graphs: bool = Field(True, description="On CUDA with PyTorch, replay the forward pass as CUDA graphs")
    polygon_processes: int = Field(0, ge=0, le=64, description=(
        "Segmentation on a GPU: trace mask outlines in this many worker processes per GPU instead of the pipeline's, "
        "whose interpreter the GPU's inference thread needs; 0 traces them in the pipeline's process"))
    inference_process: bool = Field(False, description=(
        "Run each device's model in a process of its own, which the pipeline's other threads never hold up behind "
        "the interpreter lock; frames are copied to it through shared memory. Off: on a CPU host the model runs "
        "at its own limit in the pipeline's process"))
    runtime: Literal["auto", "torch", "onnx", "openvino", "tensorrt"] = Field(
        "auto", description="auto: TensorRT on CUDA, OpenVINO on CPU when installed, else PyTorch"
    )
    export_dir: Path | None = Field(None, description="Cache of exported models; default ~/.cache/vap/exports")

    @field_validator("imgsz")
    @classmethod
    def _multiple_of_stride(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"must be a multiple of 32 (the model stride); got {value}")
        return value

    @field_validator("device")
    @classmethod
    def _device_names(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            _check_device(value, in_list=False)
            return value
        if not value:
            raise ValueError("an empty list names no device; use auto, cpu, cuda:N or a list of cuda:N")
        for index, name in enumerate(value):
            try:
                _check_device(name, in_list=True)
            except ValueError as error:
                raise _error_at((index,), str(error)) from None
        return value

    _some_classes = field_validator("classes")(_some_classes)

    @model_validator(mode="after")
    def _precision_fits(self) -> ModelConfig:
        if self.precision != "auto" and self.half != "auto":
            raise _error_at(("half",), f"is the older spelling of model.precision, which is set too "
                                       f"({self.precision}); remove model.half (half: true is precision: fp16)")
        if self.precision != "int8":
            return self
        if self.runtime not in ("auto", "openvino"):
            raise _error_at(("precision",), f"int8 runs through OpenVINO on the CPU, and model.runtime is "
                                            f"{self.runtime}; set model.runtime to openvino (or auto)")
        devices = [self.device] if isinstance(self.device, str) else self.device
        gpus = [device for device in devices if device not in ("auto", "cpu")]
        if gpus:
            raise _error_at(("precision",), f"int8 runs on the CPU (OpenVINO), and model.device is {gpus[0]}; "
                                            "use fp16 on a GPU, or model.device: cpu")
        return self

    def effective_precision(self, device: str) -> str:
        """fp32, fp16 or int8 on this device: `auto` follows `half` (FP16 on CUDA only, unless it says)."""
        if self.precision != "auto":
            return self.precision
        if self.half == "auto":
            return "fp16" if device.startswith("cuda") else "fp32"
        return "fp16" if self.half else "fp32"


def _check_device(name: str, in_list: bool) -> None:
    if name == "mps":
        raise ValueError("mps (Apple GPUs) is not supported: vap's inference runs on the CPU or CUDA; use cpu, "
                         "cuda:N or auto")
    if in_list and name == "auto":
        raise ValueError("auto cannot be one device of a list; use auto alone, or list devices such as cpu or cuda:N")
    if not re.fullmatch(r"cpu|cuda(:\d+)?|\d+" if in_list else r"auto|cpu|cuda(:\d+)?|\d+", name):
        raise ValueError(f"unknown device '{name}'; use auto, cpu, cuda:N or a list of cuda:N")


class BatchingConfig(_Section):
    max_batch: int = Field(16, ge=1, le=256, description="Frames per inference call at most")
    max_wait_ms: float = Field(20.0, ge=0, le=10_000, description="How long a partial batch may wait")
    max_same_source_frames: int | None = Field(
        None, ge=1, le=256, description="Frames one stream may give to one batch; default max_batch"
    )
    queue_size: int = Field(4, ge=1, le=1024, description="Frames buffered per stream before dropping")


class DecodingConfig(_Section):
    """Where the streams are decoded."""

    processes: int = Field(0, ge=0, le=256, description=(
        "Decode the streams in this many worker processes, frames coming back through shared memory, so that "
        "decoding never competes with inference for the interpreter's lock; 0 decodes on each stream's reader "
        "thread. Streams decoded on a GPU (decoder: cuda) stay in-process"))


class SpoolConfig(_Section):
    """Where results wait while the broker is away; beyond either bound the oldest are dropped and counted."""

    max_messages: int = Field(10_000, ge=1, le=10_000_000, description="Messages kept at most")
    max_bytes: int = Field(64 * 2**20, ge=1024, description="Encoded bytes kept at most (with dir, also the log's "
                           "size on disk)")
    dir: Path | None = Field(None, description="Log waiting messages here (synced within 0.5 s) so that a restart or "
                             "a crash of vap loses none; the next start resends them")


class SnapshotConfig(_Section):
    """Pictures of the frames: annotated thumbnails in a directory (`dir`), referenced from the messages, and
    unannotated JPEGs on a Kafka topic (`topic`) for `vap dashboard`, which draws the detections itself.
    Each is off until set."""

    dir: Path | None = Field(None, description="Write thumbnails under DIR/<stream id>/")
    topic: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]+$", max_length=249,
                              description="Publish a JPEG of every every_n_frames-th frame to this topic")
    every_n_frames: int = Field(10, ge=1, description="One picture per this many frames of a stream")
    max_width: int = Field(640, ge=32, le=8192)
    jpeg_quality: int = Field(80, ge=10, le=100)
    keep_last: int = Field(100, ge=1, description="Older thumbnails of a stream are deleted")


class KafkaConfig(_Section):
    bootstrap_servers: str = Field("localhost:9092", min_length=1)
    topic: str = Field("vap.frames", pattern=r"^[A-Za-z0-9._-]+$", max_length=249)
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "zstd"
    acks: Literal["all", "0", "1", "-1", 0, 1, -1] = "all"
    client_id: str = "vap"
    linger_ms: int = Field(5, ge=0, le=10_000)
    client_process: bool = Field(
        True, description="Run the Kafka client in a child process, so it never competes with inference for the GIL"
    )
    request_timeout_ms: int = Field(10_000, ge=1000, le=300_000)
    spool: SpoolConfig = SpoolConfig()
    snapshots: SnapshotConfig = SnapshotConfig()
    create_topic: bool = Field(True, description="Create the topic at start when it is missing")
    partitions: int = Field(3, ge=1, le=10_000, description="Partitions of a topic vap creates")
    replication: int = Field(1, ge=1, le=16, description="Replication factor of a topic vap creates")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = Field(None, description="Use ${ENV_VAR}; never logged")
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_check_hostname: bool = True

    @model_validator(mode="after")
    def _sasl_needs_credentials(self) -> KafkaConfig:
        """An empty password is allowed without SASL, where it is unused: configs fill it from an optional
        `${KAFKA_SASL_PASSWORD:-}` that is empty for brokers taking plain connections."""
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism is None:
                raise ValueError(f"security_protocol {self.security_protocol} needs sasl_mechanism")
            if not self.sasl_username or self.sasl_password is None:
                raise ValueError(f"security_protocol {self.security_protocol} needs sasl_username and sasl_password")
            if not self.sasl_password.get_secret_value():
                raise _error_at(("sasl_password",), f"is empty, and security_protocol {self.security_protocol} needs "
                                                    "the password; check that its ${VAR} is set")
        return self


class HttpConfig(_Section):
    host: str = "0.0.0.0"
    port: int = Field(9108, ge=0, le=65535, description="0 picks a free port")
    auth_token: SecretStr | None = Field(
        None, description="Bearer token for every /api/ route; use ${ENV_VAR}. Without it, changes need a loopback "
                          "host"
    )
    allowed_hosts: list[str] = Field(
        [], description="Names the control API answers for besides IP addresses and this machine's own names "
                        "(a leading *. matches subdomains); other Host headers get 400"
    )
    max_streams: int = Field(256, ge=1, le=100_000, description="Streams this process runs at most")
    max_body_bytes: int = Field(65_536, ge=1024, le=16 * 2**20, description="Largest request body the API takes")

    @field_validator("auth_token")
    @classmethod
    def _token_not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            raise ValueError("is empty, which would accept a bare 'Bearer ' header; set a token (check that its "
                             "${VAR} is set), or use null to allow stream changes from a loopback host only")
        return value


class TrackingConfig(_Section):
    tracker: Literal["bytetrack", "botsort"] = Field("bytetrack", description="Ultralytics tracker")
    events_topic: str = Field("vap.events", pattern=r"^[A-Za-z0-9._-]+$", description="Topic of vap.event.v1")


class AnalyticsStageConfig(_Section):
    """The stage after inference: each stream's tracking, zones and lines, then its messages."""

    workers: int = Field(2, ge=1, le=64, description="Threads shared by all streams; one stream uses one at a time")
    queue_size: int = Field(8, ge=1, le=1024, description="Results waiting per stream (each holds its image)")
    message_processes: int = Field(0, ge=0, le=64, description=(
        "Worker processes that build the messages of streams without tracking, zones or lines, a batch at a time, "
        "outside the interpreter the inference thread needs (0: built by the stage's threads). For GPU hosts with "
        "cores to spare; off while kafka.snapshots is set"))
    processes: int = Field(0, ge=0, le=64, description=(
        "Worker processes that run the tracking, zones and lines of streams that have them, each stream in one, "
        "outside the interpreter the inference thread needs (0: run by the stage's threads). The stage gets one "
        "more thread per process, to wait on it. For hosts that track many cameras with cores to spare; ignored "
        "with tracking.tracker botsort"))


def _host_name() -> str:
    return socket.gethostname() or "vap"


class FleetConfig(_Section):
    """Present: this replica shares the cameras with every replica of the same `group` (see docs/deploy.md)."""

    group: str = Field("vap-fleet", pattern=r"^[A-Za-z0-9._-]+$", max_length=249,
                       description="The Kafka consumer group the replicas join")
    streams_topic: str = Field("vap.streams", pattern=r"^[A-Za-z0-9._-]+$", max_length=249,
                               description="Compacted registry: key = stream id, value = its config as JSON")
    partitions: int = Field(64, ge=1, le=10_000, description="Partitions of the registry, the unit handed out")
    worker_id: str = Field(default_factory=_host_name, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$",
                           description="This replica's name (default: the host name)")
    session_timeout_ms: int = Field(10_000, ge=2000, le=300_000,
                                    description="How soon a dead replica's cameras move to the others")


class PipelineConfig(_Section):
    streams: list[StreamConfig] = Field(
        default_factory=list, description="At least one, unless fleet: is set (the registry then supplies them)"
    )
    tracking: TrackingConfig = TrackingConfig()
    analytics: AnalyticsStageConfig = AnalyticsStageConfig()
    model: ModelConfig = ModelConfig()
    batching: BatchingConfig = BatchingConfig()
    decoding: DecodingConfig = DecodingConfig()
    kafka: KafkaConfig = KafkaConfig()
    http: HttpConfig = HttpConfig()
    fleet: FleetConfig | None = Field(None, description="Share the cameras with other replicas through Kafka")

    @field_validator("streams")
    @classmethod
    def _unique_stream_ids(cls, streams: list[StreamConfig]) -> list[StreamConfig]:
        first_index: dict[str, int] = {}
        for index, stream in enumerate(streams):
            if stream.id in first_index:
                raise ValueError(
                    f"duplicate stream id '{stream.id}' (streams[{first_index[stream.id]}] and streams[{index}]); "
                    "each stream needs its own id"
                )
            first_index[stream.id] = index
        return streams

    @model_validator(mode="after")
    def _some_streams(self) -> PipelineConfig:
        if not self.streams and self.fleet is None:
            raise _error_at(("streams",), "is empty; list at least one stream (or add a fleet: section, whose "
                            "registry then supplies them)")
        if self.fleet is None and len(self.streams) > self.http.max_streams:
            raise _error_at(("streams",), f"lists {len(self.streams)} streams, more than http.max_streams "
                                          f"({self.http.max_streams}) lets one process run; raise it, or share the "
                                          "cameras between processes (fleet mode)")
        return self

    @model_validator(mode="after")
    def _events_apart_from_frames(self) -> PipelineConfig:
        if self.tracking.events_topic == self.kafka.topic:
            raise _error_at(("tracking", "events_topic"), f"is '{self.kafka.topic}', the topic of the frame results "
                            "(kafka.topic); events need their own topic, such as vap.events")
        return self


def interpolate_env(text: str, environ: Mapping[str, str] | None = None) -> str:
    """Expand `${VAR}` and `${VAR:-default}` (shell semantics) and `$${` to a literal `${`.

    Errors name the variable, never its value, since values are usually secrets.
    """
    env = os.environ if environ is None else environ
    problems: list[tuple[str, str]] = []

    def substitute(match: re.Match[str]) -> str:
        token, name, default = match.group(0), match.group(1), match.group(2)
        if token == "$${":
            return "${"
        if name is None:
            problems.append(("", "'${' starts no ${VAR} or ${VAR:-default} reference; write $${ for a literal ${"))
            return token
        if default is not None:
            return env.get(name) or default
        if name in env:
            return env[name]
        problems.append(("", f"environment variable {name} is not set; set it or write ${{{name}:-default}}"))
        return ""

    expanded = _ENV_TOKEN.sub(substitute, text)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    return expanded


def _child(path: str, key: object) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)


def _check_node(
    node: yaml.Node, path: str, environ: Mapping[str, str] | None, problems: list[tuple[str, str]], seen: set[int]
) -> None:
    """Find duplicate keys and expand `${VAR}` inside string values, before any value is constructed.

    Expanding here, not in the file's text, keeps a variable's value out of YAML's hands: a `#`, `: ` or
    newline in a password stays part of it, and a `${VAR}` in a comment is never looked at.
    `environ` None means: do not expand (for `--set` values, which the shell has expanded already).
    """
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                _check_node(value_node, path, environ, problems, seen)
                continue
            child = _child(path, key_node.value)
            line = key_node.start_mark.line + 1
            first = first_line.get((key_node.tag, key_node.value))
            if first is None:
                first_line[(key_node.tag, key_node.value)] = line
            else:
                where = f"twice on line {line}" if first == line else f"at line {line} (first at line {first})"
                problems.append((child, f"duplicate key {where}; keep only one"))
            if key_node.value == "id" and isinstance(value_node, yaml.ScalarNode) and value_node.style is None \
                    and value_node.tag != _NULL_TAG:
                value_node.tag = _STR_TAG  # ids are text: `007` must not become 7
            _check_node(value_node, child, environ, problems, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_node(item, _child(path, index), environ, problems, seen)
    elif environ is not None and isinstance(node, yaml.ScalarNode) and node.tag == _STR_TAG and "${" in node.value:
        whole = _WHOLE_REFERENCE.fullmatch(node.value)
        try:
            expanded = interpolate_env(node.value, environ)
        except ConfigError as error:
            problems.extend((path, message) for _, message in error.problems)
            return
        if whole and node.style is None and whole.group(2) in _YAML_NULLS and not environ.get(whole.group(1)):
            node.tag = _NULL_TAG  # `${TOKEN:-null}` unquoted: the file's own default reads as YAML
        node.value = expanded


def _yaml_error(error: yaml.YAMLError, text: str) -> ConfigError:
    """One line with the line and column, without PyYAML's multi-line excerpt (which may show a secret)."""
    advice = "check the quoting and indentation there"
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = ", ".join(part for part in (error.context, error.problem) if part) or "cannot be parsed"
        lines = {m.line for m in (error.context_mark, error.problem_mark) if m is not None}
        if any("${" in line for index, line in enumerate(text.splitlines()) if index in lines):
            advice = 'inside { } or [ ], quote a ${VAR} reference: {url: "${CAM_URL}"}'
    else:
        where, problem = "", str(error).splitlines()[0] if str(error) else type(error).__name__
    return ConfigError([("", f"not valid YAML{where}: {problem}; {advice}")])


def _parse_yaml(text: str, environ: Mapping[str, str] | None) -> Any:
    """YAML to plain data, with duplicate keys as errors and `${VAR}` expanded unless `environ` is None."""
    try:
        loader = yaml.SafeLoader(text)  # refuses control characters at once, before the try below
    except yaml.YAMLError as error:
        raise _yaml_error(error, text) from None
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        problems: list[tuple[str, str]] = []
        _check_node(root, "", environ, problems, set())
        if problems:
            raise ConfigError(problems)
        return loader.construct_document(root)
    except yaml.YAMLError as error:
        raise _yaml_error(error, text) from None
    finally:
        loader.dispose()


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one `--set key.path=value`; the value is parsed as YAML so numbers and lists keep their type."""
    key_path, sep, raw_value = assignment.partition("=")
    if not sep or not key_path:
        raise ConfigError([("--set", f"'{assignment}' is not key.path=value")])
    keys = key_path.split(".")
    try:
        value = _parse_yaml(raw_value, None) if raw_value else ""
    except ConfigError:
        # YAML's reason quotes the value, which may be a secret.
        raise ConfigError([(
            f"--set {key_path}",
            f"the value cannot be read as YAML; quote it as a string, e.g. --set '{key_path}=\"...\"'",
        )]) from None
    if keys[-1] == "id" and isinstance(value, int | float) and not isinstance(value, bool):
        value = raw_value.strip()
    node: Any = tree
    for depth, key in enumerate(keys[:-1]):
        child_key: str | int = int(key) if isinstance(node, list) and key.isdigit() else key
        try:
            node = node[child_key]
        except (KeyError, IndexError, TypeError):
            if isinstance(node, dict):
                node = node.setdefault(key, {})
            else:
                raise ConfigError([(".".join(keys[: depth + 1]), "does not exist")]) from None
    last = keys[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError([(key_path, "does not exist")])


def _key_path(location: tuple[int | str, ...]) -> str:
    """Turn pydantic's location into `streams[1].url`."""
    parts: list[str] = []
    for item in location:
        if isinstance(item, int) and parts:
            parts[-1] = f"{parts[-1]}[{item}]"
        else:
            parts.append(str(item))
    return ".".join(parts)


def parse_config(tree: Any) -> PipelineConfig:
    if not isinstance(tree, dict):
        raise ConfigError([("", "the config must be a YAML mapping with a 'streams' list")])
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_problems(error)) from None


def _problems(error: ValidationError, prefix: tuple[str | int, ...] = ()) -> list[tuple[str, str]]:
    problems = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check its spelling)"
        below = item.get("ctx", {}).get("at", ()) if item["type"] == "config_item" else ()
        problems.append((_key_path((*prefix, *item["loc"], *below)), message))
    return problems


def load_kafka_section(path: Path) -> tuple[KafkaConfig, str]:
    """A vap config's `kafka:` section and its events topic, for tools that only read Kafka (the dashboard).
    The rest of the file (streams, model) is not theirs to check: a file holding only `kafka:` will do."""
    tree = _parse_yaml(_read_text(path), os.environ) or {}
    if not isinstance(tree, dict):
        raise ConfigError([("", "the config must be a YAML mapping")])
    try:
        kafka = KafkaConfig.model_validate(tree.get("kafka") or {})
    except ValidationError as error:
        raise ConfigError(_problems(error, ("kafka",))) from None
    try:
        tracking = TrackingConfig.model_validate(tree.get("tracking") or {})
    except ValidationError as error:
        raise ConfigError(_problems(error, ("tracking",))) from None
    return kafka, tracking.events_topic


def load_config(
    path: Path | None,
    overrides: list[str] | None = None,
    text: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> PipelineConfig:
    """Read, interpolate, override and validate a config file (or `text`, for embedded configs)."""
    if text is None:
        if path is None:
            raise ConfigError([("", "no config given")])
        text = _read_text(path)
    tree = _parse_yaml(text, os.environ if environ is None else environ) or {}
    for assignment in overrides or []:
        apply_override(tree, assignment)
    return parse_config(tree)


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([("", f"cannot read config file {path}: {error.strerror}")]) from None
    except UnicodeDecodeError as error:
        raise ConfigError([("", f"{path} is not UTF-8 text (byte {error.start} cannot be decoded); save it as "
                                "UTF-8")]) from None


def check_files_exist(config: PipelineConfig) -> None:
    """Files named in the config must exist; kept apart from parsing so parsing stays pure."""
    problems = [
        (f"streams[{index}].url", f"file not found: {redact_url(stream.url)}")
        for index, stream in enumerate(config.streams)
        if stream.kind == "file" and not stream.file_path.is_file()
    ]
    weights = Path(config.model.weights)
    if len(weights.parts) > 1 and not weights.is_file():
        problems.append(("model.weights", f"file not found: {config.model.weights}"))
    if problems:
        raise ConfigError(problems)
