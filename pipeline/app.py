"""The composition root: builds every stage from a validated config, starts them in order, stops them
in reverse, and decides when a bounded run is over.

Start order: HTTP (so /healthz answers during warm-up), model load, publisher, warm-up, one inference
worker per device, readers; then /readyz turns 200 and the control API takes stream changes (503 before,
and again once stopping). Stop order: readers, the hub drains through the model, the workers finish their
batches, the publisher flushes within a deadline, HTTP last.
"""

from __future__ import annotations

import enum
import functools
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from pipeline import __version__
from pipeline.analytics.zones import StreamAnalytics
from pipeline.batching.hub import FrameHub
from pipeline.config import KafkaConfig, PipelineConfig, StreamConfig
from pipeline.errors import NotAcceptingChanges, StreamExists, UnknownStream
from pipeline.frames import FrameResult
from pipeline.inference.detector import Detector, UltralyticsDetector
from pipeline.inference.devices import resolve_devices, worker_for_decoder
from pipeline.inference.worker import InferenceWorker
from pipeline.ops.health import Heartbeats
from pipeline.ops.http import HttpServer, Probe, build_app
from pipeline.ops.metrics import PipelineMetrics
from pipeline.publishing.kafka_client import Producer, make_kafka_producer
from pipeline.publishing.kafka_process import KafkaChildUnusable, KafkaProcess
from pipeline.publishing.publisher import KafkaPublisher
from pipeline.sources.nvdec import NvdecSource, nvdec_available
from pipeline.sources.opencv import OpenCvSource, decoder_threads
from pipeline.sources.reader import StreamReader, max_age_for, overflow_policy_for
from pipeline.sources.source import VideoSource

log = logging.getLogger(__name__)

_STUCK_AFTER_S = 30.0
# Python hands the GIL to a waiting thread only every switch interval (5 ms by default). The inference
# thread gives the GIL up hundreds of times per batch (every kernel launch, every OpenCV call), so behind
# busy reader and publisher threads each hand-back could cost up to 5 ms; 1 ms cut a measured case 10x.
GIL_SWITCH_INTERVAL_S = 0.001
_DRAIN_TIMEOUT_S = 5.0
_READER_JOIN_S = 2.0


@dataclass(frozen=True)
class StopTimeouts:
    """How long each stage may take to stop; together well under the 10 s operators expect."""

    drain_s: float = _DRAIN_TIMEOUT_S
    kafka_flush_s: float = 3.0


class _Phase(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


@dataclass(frozen=True)
class _Incarnation:
    """One add of a stream id. A stream removed and added again under the same id (a reload's restart) still
    has results of frames read before the add in flight: they belong to the stream that was removed, so they
    are published and counted in its series (`Frame.series`), but never reach the new stream's tracker."""

    added_monotonic: float
    analytics: StreamAnalytics | None
    occupancy_keys: set[tuple[str, str]] = field(default_factory=set)


class Pipeline:
    """One running pipeline. `start()`, then `wait()` until done or stopped, then `stop()`."""

    def __init__(
        self,
        config: PipelineConfig,
        registry: CollectorRegistry | None = None,
        detector_factory: Callable[[PipelineConfig, str], Detector] | None = None,
        producer_factory: Callable[[KafkaConfig], Producer] | None = None,
        timeouts: StopTimeouts = StopTimeouts(),
    ) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.metrics = PipelineMetrics(self.registry)
        self.heartbeats = Heartbeats(self.metrics)
        self.hub = FrameHub(on_stale=lambda frame: self.metrics.drop(frame.stream_id, "stale"))
        self._detector_factory = detector_factory or _ultralytics_detector
        self._producer_factory = producer_factory
        self._kafka_process: KafkaProcess | None = None
        self._kafka_in_process = False
        self._timeouts = timeouts
        self._stop_requested = threading.Event()
        self._ready = threading.Event()
        self._processed_lock = threading.Lock()
        self._processed = 0
        self._max_frames: int | None = None
        self._results_abandoned = False
        self.detector: Detector | None = None
        self.publisher: KafkaPublisher | None = None
        self.workers: list[InferenceWorker] = []
        self.readers: dict[str, StreamReader] = {}
        self.http: HttpServer | None = None
        self._phase = _Phase.NEW
        self._streams_lock = threading.RLock()
        self._incarnations: dict[str, _Incarnation] = {}
        self._started_monotonic = time.monotonic()

    @property
    def processed(self) -> int:
        return self._processed

    @property
    def kafka_client_pid(self) -> int | None:
        """The Kafka client's child process, when it runs in one (for memory accounting)."""
        return None if self._kafka_process is None else self._kafka_process.pid

    def start(self, max_frames: int | None = None) -> None:
        config = self.config
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._max_frames = max_frames
        with self._streams_lock:
            self._phase = _Phase.STARTING
        token = config.http.auth_token.get_secret_value() if config.http.auth_token is not None else None
        self.http = HttpServer(config.http.host, config.http.port, build_app(self, config.http.host, token))
        self.http.start()
        self._started_monotonic = time.monotonic()
        log.info("metrics and health on http://%s:%d", config.http.host, self.http.port)
        if self._producer_factory is None and config.kafka.client_process:
            self._kafka_process = KafkaProcess(self.heartbeats)
            self._kafka_process.start()  # its imports overlap the model's loading
        devices = resolve_devices(config.model.device)
        detectors = [self._detector_factory(config, device) for device in devices]
        self.detector = detectors[0]
        self.hub.set_workers(len(detectors))
        for detector in detectors:
            self.metrics.build_info.labels(version=__version__, model=detector.name, device=detector.device).set(1)
        producer_factory = self._producer_factory or make_kafka_producer
        if self._kafka_process is not None:
            producer_factory = self._open_producer_in_child
        self.publisher = KafkaPublisher(
            config.kafka, self.detector.name, self.metrics, self.heartbeats, producer_factory,
            events_topic=config.tracking.events_topic,
        )
        self.publisher.start()
        for index, detector in enumerate(detectors):
            if config.model.warmup:
                log.info("warming up %s on %s", detector.name, detector.device)
                detector.warmup([1, config.batching.max_batch])
            worker = InferenceWorker(
                detector, self.hub, config.batching, self._deliver, self.metrics, self.heartbeats, index
            )
            self.workers.append(worker)
            worker.start()
        with self._streams_lock:
            for stream in config.streams:
                self._add_stream(stream)
            if self._phase is _Phase.STARTING:
                self._phase = _Phase.RUNNING
                self._ready.set()
        log.info("ready: %d stream(s), model %s on %s (%s)", len(self.readers), self.detector.name,
                 ", ".join(devices), self.detector.runtime)

    def _open_producer_in_child(self, config: KafkaConfig) -> Producer:
        """The child's producer, or this process's own once the child has shown it cannot start here: results
        must reach Kafka either way."""
        if self._kafka_process is not None and not self._kafka_in_process:
            try:
                return self._kafka_process.open_producer(config)
            except KafkaChildUnusable as error:
                log.error("%s; running the Kafka client in this process from now on", error)
                self._kafka_in_process = True
        return make_kafka_producer(config)

    def add_stream(self, stream: StreamConfig) -> None:
        """Start reading one more stream; the others never pause."""
        with self._streams_lock:
            self._check_accepting_changes()
            self._add_stream(stream)

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
        with self._streams_lock:
            if stream.id in self.readers:
                raise StreamExists(stream.id)
            if stream.kind == "file" and not stream.file_path.is_file():
                raise ValueError(f"url: file not found: {stream.redacted_url}")
            if stream.decoder != "cpu" and not nvdec_available():
                raise ValueError(f"decoder: {stream.decoder} needs PyNvVideoCodec and an NVIDIA driver "
                                 "(pip install 'vap[nvdec]'), or use decoder: cpu")
            analytics = None
            if stream.analytics.tracks:
                assert self.detector is not None
                analytics = StreamAnalytics(
                    stream.id, stream.analytics, self.config.tracking.tracker, self.detector.labels
                )
            source_factory = self._source_factory(stream)
            self.metrics.add_stream(stream.id)
            self.hub.add_stream(
                stream.id, self.config.batching.queue_size, overflow_policy_for(stream), max_age_for(stream),
                worker=worker_for_decoder(stream.decoder, [worker.device for worker in self.workers]),
            )
            try:
                reader = StreamReader(stream, self.hub, self.metrics, self.heartbeats, source_factory)
                incarnation = _Incarnation(time.monotonic(), analytics)
                reader.start()
            except BaseException:
                self.hub.remove_stream(stream.id)
                self.metrics.remove_stream(stream.id)
                raise
            self.readers[stream.id] = reader
            self._incarnations[stream.id] = incarnation
        log.info("stream %s: added (%s)", stream.id, stream.redacted_url, extra={"stream": stream.id})

    def _source_factory(self, stream: StreamConfig) -> Callable[[StreamConfig], VideoSource]:
        if stream.decoder != "cpu":
            return NvdecSource
        threads = decoder_threads(max(len(self.config.streams), len(self.readers) + 1))
        return functools.partial(OpenCvSource, threads=threads)

    def remove_stream(self, stream_id: str) -> None:
        """Stop one stream without waiting for it: a reader stuck in a blocking open is reaped later."""
        with self._streams_lock:
            self._check_accepting_changes()
            reader = self.readers.pop(stream_id, None)
            if reader is None:
                raise UnknownStream(stream_id)
            reader.stop()
            self.hub.remove_stream(stream_id)
            self.metrics.remove_stream(stream_id)
            self._incarnations.pop(stream_id, None)
        threading.Thread(target=self._reap, args=(reader,), name=f"reap-{stream_id}", daemon=True).start()
        log.info("stream %s: removed", stream_id, extra={"stream": stream_id})

    def _reap(self, reader: StreamReader) -> None:
        """Only says when a removed reader does not end: what it still does reaches neither the metrics nor
        the frames of a stream added again under its id."""
        if not reader.join(timeout=60):
            log.warning("stream %s: reader still blocked 60 s after removal", reader.config.id)

    def list_streams(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._streams_lock:
            readers = list(self.readers.values())
        streams = []
        for reader in readers:
            totals = self.metrics.frame_totals(reader.config.id)
            streams.append({
                "id": reader.config.id,
                "url": reader.config.redacted_url,
                "kind": reader.config.kind,
                "state": reader.state.value,
                "last_frame_age_s": None if reader.last_frame_monotonic is None
                else round(now - reader.last_frame_monotonic, 3),
                "frames_read": None if totals is None else totals.read,
                "frames_processed": None if totals is None else totals.processed,
            })
        return streams

    def status(self) -> dict[str, Any]:
        publisher = self.publisher
        return {
            "version": __version__,
            "uptime_s": round(time.monotonic() - self._started_monotonic, 1),
            "ready": self._ready.is_set(),
            "model": None if self.detector is None else {
                "name": self.detector.name, "task": self.detector.task,
                "device": ", ".join(worker.device for worker in self.workers) or self.detector.device,
                "runtime": self.detector.runtime,
            },
            "streams": len(self.readers),
            "frames_processed": self._processed,
            "kafka": None if publisher is None else {
                "topic": self.config.kafka.topic, "connected": publisher.connected, "backlog": publisher.backlog()
            },
        }

    def _deliver(self, result: FrameResult) -> None:
        assert self.publisher is not None
        if self._results_abandoned:
            return  # counted as dropped when the stop gave up on its worker
        frame = result.frame
        incarnation = self._incarnations.get(frame.stream_id)
        if incarnation is not None and frame.captured_monotonic < incarnation.added_monotonic:
            incarnation = None  # read before the stream was added again: published, but not the new run's analytics
        if incarnation is not None and incarnation.analytics is not None:
            result, events = incarnation.analytics.process(result)
            self._set_occupancy(frame.stream_id, incarnation.occupancy_keys, incarnation.analytics.occupancy())
        else:
            events = []
        self.publisher.submit(result)
        for event in events:
            self.publisher.submit(event)
        with self._processed_lock:
            self._processed += 1
            if self._max_frames is not None and self._processed >= self._max_frames:
                self._stop_requested.set()

    def _set_occupancy(self, stream_id: str, keys: set[tuple[str, str]], counts: dict[tuple[str, str], int]) -> None:
        """`keys`: every zone and label this stream has reported, so a zone that empties goes back to 0."""
        keys |= set(counts)
        series = self.metrics.stream(stream_id)
        for zone_id, label in keys:
            series.occupancy(zone_id, label).set(counts.get((zone_id, label), 0))

    def request_stop(self) -> None:
        """Safe from signal handlers: only sets a flag that `wait` watches."""
        self._stop_requested.set()

    def sources_exhausted(self) -> bool:
        """Every stream was a file that ended, and every frame read went through the model."""
        with self._streams_lock:
            readers = list(self.readers.values())
        return bool(readers) and all(reader.finished.is_set() for reader in readers) and self.hub.drained()

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
        for reader in readers:
            reader.stop()
        readers_deadline = time.monotonic() + _READER_JOIN_S  # one for all: stuck readers must not add up
        for reader in readers:
            if not reader.join(max(0.0, readers_deadline - time.monotonic())):
                log.warning("stream %s: reader did not stop in time; leaving it behind", reader.config.id)
        deadline = time.monotonic() + self._timeouts.drain_s
        while self.workers and not self.hub.drained() and time.monotonic() < deadline:
            time.sleep(0.02)
        left = self.hub.discard_waiting()
        for frame in left:
            (frame.series or self.metrics.stream(frame.stream_id)).dropped["shutdown"].inc()
        if left:
            log.warning("stopping with %d frame(s) read but not inferred after %.0f s of draining; counted as "
                        "dropped (shutdown)", len(left), self._timeouts.drain_s)
        for worker in self.workers:
            worker.stop()
        for worker in self.workers:
            worker.join(max(0.1, deadline + self._timeouts.drain_s - time.monotonic()))
        stuck = [worker.thread_name for worker in self.workers if worker.is_alive()]
        if stuck:
            self._results_abandoned = True
            lost = self.hub.abandon_in_flight()
            for frame in lost:
                (frame.series or self.metrics.stream(frame.stream_id)).dropped["shutdown"].inc()
            log.warning("%s did not finish in time; the %d frame(s) in its batches are counted as dropped "
                        "(shutdown)", ", ".join(stuck), len(lost))
        if self.publisher is not None:
            self.publisher.stop(self._timeouts.kafka_flush_s)
            self.publisher.join(self._timeouts.kafka_flush_s + 3)
        if self._kafka_process is not None:
            self._kafka_process.close()
        if self.http is not None:
            self.http.stop()
        log.info("stopped after %d processed frame(s)", self._processed)

    def health(self) -> Probe:
        stuck = self.heartbeats.stuck(_STUCK_AFTER_S)
        dead = [
            name
            for name, alive in (
                ("inference", all(worker.is_alive() for worker in self.workers) or self._phase is _Phase.STOPPING),
                ("publisher", self.publisher is None or self.publisher.is_alive() or self._phase is _Phase.STOPPING),
            )
            if not alive
        ]
        ok = not stuck and not dead
        return Probe(ok, {"status": "ok" if ok else "failing", "stuck": stuck, "dead": dead})

    def readiness(self) -> Probe:
        streams = {
            entry["id"]: {"state": entry["state"], "last_frame_age_s": entry["last_frame_age_s"]}
            for entry in self.list_streams()
        }
        publisher = self.publisher
        spool_limit = self.config.kafka.spool.max_messages
        overflowing = publisher is not None and publisher.overflowing()
        kafka_ok = publisher is not None and not overflowing
        ready = self._ready.is_set() and kafka_ok
        body = {
            "ready": ready,
            "model_warm": self._ready.is_set(),
            "kafka": None if publisher is None else {
                "connected": publisher.connected, "backlog": publisher.backlog(), "spool_limit": spool_limit,
                "dropping": overflowing,
            },
            "streams": streams,
        }
        return Probe(ready, body)


def _ultralytics_detector(config: PipelineConfig, device: str) -> Detector:
    return UltralyticsDetector(config.model, device, config.batching.max_batch)
