"""The composition root: builds every stage from a validated config, starts them in order, stops them
in reverse, and decides when a bounded run is over.

Start order: HTTP (so /healthz answers during warm-up), model load, publisher, analytics stage, warm-up,
one inference worker per device, readers; then /readyz turns 200 and the control API takes stream changes
(503 before, and again once stopping). Stop order: readers, the hub drains through the model, the workers
finish their batches, the analytics stage empties, the publisher flushes, HTTP last; all within one
budget (`StopTimeouts`), and whatever a stop leaves behind is dropped (shutdown) in the ledger.
"""

from __future__ import annotations

import enum
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from pipeline import __version__
from pipeline.analytics.stage import AnalyticsStage
from pipeline.batching.hub import FrameHub, OverflowPolicy
from pipeline.children import HelperPool
from pipeline.config import KafkaConfig, PipelineConfig, StreamConfig
from pipeline.errors import NotAcceptingChanges, StreamExists, UnknownStream
from pipeline.fleet.node import FleetNode
from pipeline.frames import Frame, FrameResult
from pipeline.inference.detector import Detector, UltralyticsDetector
from pipeline.inference.devices import resolve_devices, worker_for_decoder
from pipeline.inference.offline import keep_model_libraries_offline
from pipeline.inference.process_detector import ProcessDetector
from pipeline.inference.worker import InferenceWorker, drain_and_stop
from pipeline.ledger import FrameLedger
from pipeline.ops import probes
from pipeline.ops.health import Heartbeats
from pipeline.ops.http import HttpServer, Probe, build_app
from pipeline.ops.metrics import PipelineMetrics
from pipeline.publishing.building import MessageBuilder
from pipeline.publishing.kafka_client import Producer, make_kafka_producer
from pipeline.publishing.kafka_process import KafkaProcess
from pipeline.publishing.publisher import KafkaPublisher
from pipeline.publishing.snapshot_topic import SnapshotPublisher
from pipeline.sources.choice import local_source_factory
from pipeline.sources.decoder_pool import DecoderPool
from pipeline.sources.nvdec import nvdec_available
from pipeline.sources.opencv import decoder_threads
from pipeline.sources.reader import StreamReader, max_age_for, overflow_policy_for
from pipeline.sources.source import VideoSource

log = logging.getLogger(__name__)

# Python hands the GIL to a waiting thread only every switch interval (5 ms by default). The inference
# thread gives the GIL up hundreds of times per batch (every kernel launch, every OpenCV call), so behind
# busy reader and publisher threads each hand-back could cost up to 5 ms; 1 ms cut a measured case 10x.
GIL_SWITCH_INTERVAL_S = 0.001


@dataclass(frozen=True)
class StopTimeouts:
    """How long each stage may take to stop. Each stage gets its share of one deadline, so together they
    stay within the 10 s a service manager gives before it kills the process, however stuck a stage is."""

    readers_s: float = 1.0
    drain_s: float = 2.5  # the frames waiting in the hub go through the model
    workers_s: float = 1.5  # the batches the model holds come back
    analytics_s: float = 1.0
    kafka_flush_s: float = 2.5
    kafka_close_s: float = 0.5
    fleet_leave_s: float = 0.5  # fleet mode: leaving the group began with the stop; what is left of it
    http_s: float = 0.5


class _Phase(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


class Pipeline:
    """One running pipeline. `start()`, then `wait()` until done or stopped, then `stop()`."""

    def __init__(
        self,
        config: PipelineConfig,
        registry: CollectorRegistry | None = None,
        detector_factory: Callable[[PipelineConfig, str], Detector] | None = None,
        producer_factory: Callable[[KafkaConfig], Producer] | None = None,
        timeouts: StopTimeouts = StopTimeouts(),
        config_path: Path | None = None,
    ) -> None:
        keep_model_libraries_offline()
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.metrics = PipelineMetrics(self.registry, helpers=lambda: self.helpers)
        self.heartbeats = Heartbeats(self.metrics)
        self._decoders = None if config.decoding.processes == 0 else DecoderPool(config.decoding.processes)
        self.ledger = FrameLedger(self.metrics)
        self.hub = FrameHub(on_stale=lambda frame: self.ledger.dropped(frame.ticket, "stale"))
        self._detector_factory = detector_factory or _ultralytics_detector
        self._producer_factory = producer_factory
        self._kafka_process: KafkaProcess | None = None
        self._timeouts = timeouts
        self._stop_requested = threading.Event()
        self._workers_stopping = threading.Event()
        self._ready = threading.Event()
        self._processed_lock = threading.Lock()
        self._processed = 0
        self._max_frames: int | None = None
        self._results_abandoned = False
        self.detector: Detector | None = None
        self.publisher: KafkaPublisher | None = None
        self.snapshots: SnapshotPublisher | None = None
        self.analytics: AnalyticsStage | None = None
        self.workers: list[InferenceWorker] = []
        self.readers: dict[str, StreamReader] = {}
        self.http: HttpServer | None = None
        self.fleet = None if config.fleet is None else FleetNode(
            config.kafka, config.fleet, _FleetHands(self), self.registry, self.heartbeats, config_path)
        self._phase = _Phase.NEW
        self._streams_lock = threading.RLock()
        self.started_monotonic = time.monotonic()

    @property
    def processed(self) -> int:
        """Frames inferred and handed to the analytics stage (what `--max-frames` counts)."""
        return self._processed

    @property
    def helpers(self) -> dict[str, list[HelperPool]]:
        """Every pool of processes working for this pipeline now, by role (for metrics and CPU accounting)."""
        return _helper_pools(self._kafka_process, self._decoders, self.workers, self.analytics)

    @property
    def helper_pids(self) -> dict[str, list[int]]:
        return {role: [pid for pool in pools for pid in pool.pids] for role, pools in self.helpers.items()}

    def start(self, max_frames: int | None = None) -> None:
        config = self.config
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._max_frames = max_frames
        with self._streams_lock:
            self._phase = _Phase.STARTING
        self.http = HttpServer(config.http.host, config.http.port, build_app(self, config.http))
        self.http.start()
        self.started_monotonic = time.monotonic()
        log.info("metrics and health on http://%s:%d", config.http.host, self.http.port)
        if self._producer_factory is None and config.kafka.client_process:
            self._kafka_process = KafkaProcess(self.heartbeats)
            self._kafka_process.start()  # its imports overlap the model's loading
        devices = resolve_devices("cpu" if config.model.precision == "int8" else config.model.device)
        detectors = [self._detector_factory(config, device) for device in devices]
        self.detector = detectors[0]
        self.hub.set_workers(len(detectors))
        for detector in detectors:
            self.metrics.build_info.labels(version=__version__, model=detector.name, device=detector.device).set(1)
        self._start_publishing(self.detector.name)
        for index, detector in enumerate(detectors):
            if config.model.warmup:
                log.info("warming up %s on %s", detector.name, detector.device)
                detector.warmup([1, config.batching.max_batch])
            worker = InferenceWorker(detector, self.hub, config.batching, self._deliver, self.ledger, self.metrics,
                                     self.heartbeats, index)
            self.workers.append(worker)
            worker.start()
        with self._streams_lock:
            if config.fleet is None:
                for stream in config.streams:
                    self._add_stream(stream)
            if self._phase is _Phase.STARTING:
                self._phase = _Phase.RUNNING
                self._ready.set()
        if self.fleet is not None:
            self.fleet.start(config.streams)
        log.info("ready: %d stream(s), model %s on %s (%s %s)", len(self.readers), self.detector.name,
                 ", ".join(devices), self.detector.runtime, getattr(self.detector, "precision", ""))

    def _start_publishing(self, model_name: str) -> None:
        config = self.config
        producer_factory = self._producer_factory or make_kafka_producer
        if self._kafka_process is not None:
            producer_factory = self._kafka_process.open_producer_or_local
        worker = [] if config.fleet is None else [("worker", config.fleet.worker_id.encode())]
        self.publisher = KafkaPublisher(config.kafka, self.ledger, self.metrics, self.heartbeats, producer_factory,
                                        events_topic=config.tracking.events_topic, extra_headers=worker)
        self.publisher.start()
        if config.kafka.snapshots.topic is not None:
            self.snapshots = SnapshotPublisher(config.kafka, self.metrics, self.heartbeats, worker)
            self.snapshots.start()
        builder = MessageBuilder(model_name, config.kafka.snapshots,
                                 None if self.snapshots is None else self.snapshots.offer, self.metrics)
        self.analytics = AnalyticsStage(config.analytics, builder, self.publisher.submit, self.ledger, self.metrics,
                                        self.heartbeats)
        self.analytics.start()

    def add_stream(self, stream: StreamConfig) -> None:
        """Start reading one more stream; the others never pause. In fleet mode the stream goes into the
        registry, and the replica that owns its partition starts it."""
        if self.fleet is not None:
            self._check_accepting_changes()
            self.fleet.add(stream)
            return
        self.run_stream(stream)

    def run_stream(self, stream: StreamConfig) -> None:
        """Start a stream in this process (the fleet's way in: it bypasses the registry)."""
        with self._streams_lock:
            self._check_accepting_changes()
            self._add_stream(stream)

    def sync_file_streams(self, streams: list[StreamConfig]) -> bool:
        """In fleet mode, a reloaded file's streams go to the registry; says whether it did that."""
        if self.fleet is not None:
            self.fleet.sync_file_streams(streams)
        return self.fleet is not None

    def local_streams(self) -> dict[str, StreamConfig]:
        with self._streams_lock:
            return {stream_id: reader.config for stream_id, reader in self.readers.items()}

    def _check_accepting_changes(self) -> None:
        """Stream changes wait for `start` to finish: before the model is loaded a stream's analytics cannot be
        built, and a stream added under an id of the config would make `start` fail. Once `stop` has begun,
        a new reader would never be stopped. Before `start` nothing runs that a change could race."""
        if self._phase is _Phase.STARTING:
            raise NotAcceptingChanges("starting; stream changes are accepted once ready")
        if self._phase is _Phase.STOPPING:
            raise NotAcceptingChanges("stopping; stream changes are no longer accepted")

    def _add_stream(self, stream: StreamConfig) -> None:
        """Everything that can refuse the stream runs before anything is registered: a refused stream must
        leave no buffer and no series behind (a `vap_stream_up` of 0 for ever would fire the stream-down
        alert for a stream that never ran)."""
        if stream.id in self.readers:
            raise StreamExists(stream.id)
        _check_runnable_here(stream)
        assert self.detector is not None and self.analytics is not None
        analytics = None
        if stream.analytics.tracks:
            analytics = self.analytics.new_analysis(stream.id, stream.analytics, self.config.tracking.tracker,
                                                    self.detector.labels)
        source_factory = _source_factory(self._decoders, stream, max(len(self.config.streams), len(self.readers) + 1))
        run = self.ledger.add_stream(stream.id)
        policy = overflow_policy_for(stream)
        self.hub.add_stream(stream.id, self.config.batching.queue_size, policy, max_age_for(stream),
                            worker=worker_for_decoder(stream.decoder, [worker.device for worker in self.workers]))
        self.analytics.add_stream(stream.id, run, analytics, wait_when_full=policy is OverflowPolicy.WAIT)
        try:
            lease = None if self.fleet is None else self.fleet.member.lease_valid
            reader = StreamReader(stream, run, self.hub, self.ledger, self.metrics, self.heartbeats, source_factory,
                                  lease)
            reader.start()
        except BaseException:
            self._forget_stream(stream.id, run)
            raise
        self.readers[stream.id] = reader
        log.info("stream %s: added (%s)", stream.id, stream.redacted_url, extra={"stream": stream.id})

    def remove_stream(self, stream_id: str) -> None:
        """Stop one stream without waiting for it: a reader stuck in a blocking open is reaped later. In fleet
        mode it leaves the registry, and its owner stops it."""
        if self.fleet is not None:
            self._check_accepting_changes()
            self.fleet.remove(stream_id)
            return
        self._remove_local(stream_id)

    def _remove_local(self, stream_id: str) -> StreamReader:
        with self._streams_lock:
            self._check_accepting_changes()
            reader = self.readers.pop(stream_id, None)
            if reader is None:
                raise UnknownStream(stream_id)
            reader.stop()
            self._forget_stream(stream_id, reader.run)
            self.heartbeats.forget_death(reader.thread_name)
        threading.Thread(target=_reap, args=(reader,), name=f"reap-{stream_id}", daemon=True).start()
        log.info("stream %s: removed", stream_id, extra={"stream": stream_id})
        return reader

    def _forget_stream(self, stream_id: str, run: int) -> None:
        """Frames still waiting for the model are dropped; those already inferred are published, without
        reaching a new run's analytics."""
        assert self.analytics is not None
        for frame in self.hub.remove_stream(stream_id):
            self.ledger.dropped(frame.ticket, "stream_removed")
        self.analytics.remove_stream(run)
        self.ledger.remove_stream(stream_id)

    @property
    def stopping(self) -> bool:
        return self._phase is _Phase.STOPPING

    @property
    def ready(self) -> bool:
        """The model is loaded and warm, and the configured streams are started."""
        return self._ready.is_set()

    def running_readers(self) -> list[StreamReader]:
        with self._streams_lock:
            return list(self.readers.values())

    def list_streams(self) -> list[dict[str, Any]]:
        return probes.list_streams(self)

    def status(self) -> dict[str, Any]:
        return probes.status(self)

    def health(self) -> Probe:
        return probes.health(self)

    def readiness(self) -> Probe:
        return probes.readiness(self)

    def fleet_info(self) -> dict[str, Any] | None:
        return None if self.fleet is None else self.fleet.info()

    def _deliver(self, results: list[FrameResult]) -> None:
        """The inference workers' hand-off to the analytics stage."""
        assert self.analytics is not None
        if self._results_abandoned:
            return  # counted as dropped when the stop gave up on its worker
        self.analytics.submit_batch(results, self._workers_stopping)
        with self._processed_lock:
            self._processed += len(results)
            if self._max_frames is not None and self._processed >= self._max_frames:
                self._stop_requested.set()

    def request_stop(self) -> None:
        """Safe from signal handlers: only sets a flag that `wait` watches."""
        self._stop_requested.set()

    def sources_exhausted(self) -> bool:
        """Every stream was a file that ended, and every frame read went through the model and analytics."""
        readers = self.running_readers()
        analytics_done = self.analytics is None or self.analytics.drained()
        return (bool(readers) and all(reader.finished.is_set() for reader in readers) and self.hub.drained()
                and analytics_done)

    def wait(self, duration_s: float | None = None) -> str:
        """Block until a stop is requested, the duration passes, or all files are done; says which."""
        deadline = None if duration_s is None else time.monotonic() + duration_s
        while True:
            if self._stop_requested.wait(timeout=0.1):
                return "stop requested" if self._max_frames is None or self._processed < self._max_frames \
                    else "max frames reached"
            if deadline is not None and time.monotonic() >= deadline:
                return "duration reached"
            if self.sources_exhausted():
                return "all sources finished"

    def stop(self) -> None:
        with self._streams_lock:
            if self._phase is _Phase.STOPPING:
                return
            self._phase = _Phase.STOPPING
            self._ready.clear()
            readers = list(self.readers.values())
        timeouts = self._timeouts
        _stop_readers(readers, timeouts.readers_s, self._decoders)
        if self.fleet is not None:
            self.fleet.leave()  # the others start these streams while this one drains what it read
        if drain_and_stop(self.workers, self.hub, time.monotonic() + timeouts.drain_s, timeouts.workers_s,
                          self._workers_stopping, lambda frames, where: _drop_at_stop(self.ledger, frames, where)):
            self._results_abandoned = True
        if self.analytics is not None:
            self.analytics.stop_within(time.monotonic() + timeouts.analytics_s)
        _stop_publishing(self.publisher, self.snapshots, self._kafka_process, timeouts)
        if self.fleet is not None:
            self.fleet.stop(timeouts.fleet_leave_s)
        if self.http is not None:
            self.http.stop(timeouts.http_s)
        log.info("stopped: %s", self.ledger.overall())


def _stop_readers(readers: list[StreamReader], within_s: float, decoders: DecoderPool | None) -> None:
    """One deadline for all: stuck readers must not add up. The decoder processes go after the readers, so a
    reader still waiting for a frame then hears its stream end."""
    for reader in readers:
        reader.stop()
    deadline = time.monotonic() + within_s
    for reader in readers:
        if not reader.join(max(0.0, deadline - time.monotonic())):
            log.warning("stream %s: reader did not stop in time; leaving it behind", reader.config.id)
    if decoders is not None:
        decoders.close(timeout_s=0.5)


def _drop_at_stop(ledger: FrameLedger, frames: list[Frame], where: str) -> None:
    for frame in frames:
        ledger.dropped(frame.ticket, "shutdown")
    if frames:
        log.warning("stopping with %d frame(s) %s; counted as dropped (shutdown)", len(frames), where)


def _stop_publishing(publisher: KafkaPublisher | None, snapshots: SnapshotPublisher | None,
                     kafka_process: KafkaProcess | None, timeouts: StopTimeouts) -> None:
    """Results flush within their budget; pictures stop at the same time, never worth waiting for."""
    if snapshots is not None:
        snapshots.stop()
    if publisher is not None:
        publisher.stop(timeouts.kafka_flush_s)
        if not publisher.join(timeouts.kafka_flush_s + 0.2):
            log.warning("the publisher did not finish in time")
    if snapshots is not None:
        snapshots.join(timeouts.kafka_close_s)
    if kafka_process is not None:
        kafka_process.close(timeouts.kafka_close_s)


class _FleetHands:
    """What the fleet node does to this process's streams: start one, stop some (and wait for them)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    def run_stream(self, stream: StreamConfig) -> None:
        self._pipeline.run_stream(stream)

    def local_streams(self) -> dict[str, StreamConfig]:
        return self._pipeline.local_streams()

    def stop_streams(self, stream_ids: Iterable[str], wait_s: float) -> None:
        """Stop them all, then wait up to `wait_s` for their readers to end, all together."""
        readers = []
        for stream_id in stream_ids:
            try:
                readers.append(self._pipeline._remove_local(stream_id))
            except UnknownStream:
                continue
        deadline = time.monotonic() + wait_s
        for reader in readers:
            reader.join(max(0.0, deadline - time.monotonic()))


def _check_runnable_here(stream: StreamConfig) -> None:
    """Raises ValueError, naming the key, for a stream this machine cannot run."""
    if stream.kind == "file" and not stream.file_path.is_file():
        raise ValueError(f"url: file not found: {stream.redacted_url}")
    if stream.decoder != "cpu" and not nvdec_available():
        raise ValueError(f"decoder: {stream.decoder} needs PyNvVideoCodec and an NVIDIA driver "
                         "(pip install 'vap[nvdec]'), or use decoder: cpu")


def _helper_pools(kafka: KafkaProcess | None, decoders: DecoderPool | None, workers: list[InferenceWorker],
                  stage: AnalyticsStage | None) -> dict[str, list[HelperPool]]:
    pools: dict[str, list[HelperPool | None]] = {
        "Kafka client process": [kafka], "decoder processes": [decoders],
        "inference processes": [worker.detector if isinstance(worker.detector, ProcessDetector) else None
                                for worker in workers],
        "polygon processes": [getattr(worker.detector, "polygon_pool", None) for worker in workers],
        "message processes": [None if stage is None else stage.messages],
        "analytics processes": [None if stage is None else stage.processes]}
    return {role: [pool for pool in found if pool is not None] for role, found in pools.items()}


def _ultralytics_detector(config: PipelineConfig, device: str) -> Detector:
    urls = [stream.url for stream in config.streams]
    if config.model.inference_process:
        return ProcessDetector(config.model, device, config.batching.max_batch, calibration_urls=urls)
    return UltralyticsDetector(config.model, device, config.batching.max_batch, calibration_urls=urls)


def _source_factory(decoders: DecoderPool | None, stream: StreamConfig,
                    streams: int) -> Callable[[StreamConfig], VideoSource]:
    """In a decoder process when there are some (`decoding.processes`) and the stream decodes on the CPU."""
    if decoders is not None and stream.decoder == "cpu":
        return decoders.source_factory(decoder_threads(streams))
    return local_source_factory(stream, decoder_threads(streams))


def _reap(reader: StreamReader) -> None:
    """Only says when a removed reader does not end: what it still does reaches neither the metrics nor the
    frames of a stream added again under its id."""
    if not reader.join(timeout=60):
        log.warning("stream %s: reader still blocked 60 s after removal", reader.config.id)
