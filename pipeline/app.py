"""The composition root: builds every stage from a validated config, starts them in order, stops them
in reverse, and decides when a bounded run is over.

Start order: HTTP (so /healthz answers during warm-up), publisher, model load and warm-up (then
/readyz turns 200), readers, inference worker. Stop order: readers, the hub drains through the model,
the worker finishes its batch, the publisher flushes within a deadline, HTTP last.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from pipeline import __version__
from pipeline.batching import FrameHub
from pipeline.config import KafkaConfig, PipelineConfig
from pipeline.frames import FrameResult
from pipeline.health import Heartbeats
from pipeline.http import HttpServer, Probe
from pipeline.inference import Detector, InferenceWorker, UltralyticsDetector, resolve_device
from pipeline.metrics import PipelineMetrics
from pipeline.publishing import KafkaPublisher, Producer, make_kafka_producer
from pipeline.sources import StreamReader, StreamState, max_age_for, overflow_policy_for

log = logging.getLogger(__name__)

_STUCK_AFTER_S = 30.0
_DRAIN_TIMEOUT_S = 5.0
_READER_JOIN_S = 2.0


@dataclass(frozen=True)
class StopTimeouts:
    """How long each stage may take to stop; together well under the 10 s operators expect."""

    drain_s: float = _DRAIN_TIMEOUT_S
    kafka_flush_s: float = 3.0


class Pipeline:
    """One running pipeline. `start()`, then `wait()` until done or stopped, then `stop()`."""

    def __init__(
        self,
        config: PipelineConfig,
        registry: CollectorRegistry | None = None,
        detector_factory: Callable[[PipelineConfig], Detector] | None = None,
        producer_factory: Callable[[KafkaConfig], Producer] = make_kafka_producer,
        timeouts: StopTimeouts = StopTimeouts(),
    ) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.metrics = PipelineMetrics(self.registry)
        self.heartbeats = Heartbeats(self.metrics)
        self.hub = FrameHub(on_stale=lambda frame: self.metrics.drop(frame.stream_id, "stale"))
        self._detector_factory = detector_factory or _ultralytics_detector
        self._producer_factory = producer_factory
        self._timeouts = timeouts
        self._stop_requested = threading.Event()
        self._ready = threading.Event()
        self._processed_lock = threading.Lock()
        self._processed = 0
        self._max_frames: int | None = None
        self.detector: Detector | None = None
        self.publisher: KafkaPublisher | None = None
        self.worker: InferenceWorker | None = None
        self.readers: dict[str, StreamReader] = {}
        self.http: HttpServer | None = None
        self._stopped = False

    @property
    def processed(self) -> int:
        return self._processed

    def start(self, max_frames: int | None = None) -> None:
        config = self.config
        self._max_frames = max_frames
        self.http = HttpServer(config.http.host, config.http.port, self.registry, self.health, self.readiness)
        self.http.start()
        log.info("metrics and health on http://%s:%d", config.http.host, self.http.port)
        self.detector = self._detector_factory(config)
        self.metrics.build_info.labels(
            version=__version__, model=self.detector.name, device=self.detector.device
        ).set(1)
        self.publisher = KafkaPublisher(
            config.kafka, self.detector.name, self.metrics, self.heartbeats, self._producer_factory
        )
        self.publisher.start()
        if config.model.warmup:
            log.info("warming up %s on %s", self.detector.name, self.detector.device)
            self.detector.warmup([1, config.batching.max_batch])
        for stream in config.streams:
            self.metrics.add_stream(stream.id)
            self.hub.add_stream(
                stream.id, config.batching.queue_size, overflow_policy_for(stream), max_age_for(stream)
            )
            reader = StreamReader(stream, self.hub, self.metrics, self.heartbeats)
            self.readers[stream.id] = reader
        self.worker = InferenceWorker(
            self.detector, self.hub, config.batching, self._deliver, self.metrics, self.heartbeats
        )
        self.worker.start()
        for reader in self.readers.values():
            reader.start()
        self._ready.set()
        log.info("ready: %d stream(s), model %s on %s", len(self.readers), self.detector.name, self.detector.device)

    def _deliver(self, result: FrameResult) -> None:
        assert self.publisher is not None
        self.publisher.submit(result)
        with self._processed_lock:
            self._processed += 1
            if self._max_frames is not None and self._processed >= self._max_frames:
                self._stop_requested.set()

    def request_stop(self) -> None:
        """Safe from signal handlers: only sets a flag that `wait` watches."""
        self._stop_requested.set()

    def sources_exhausted(self) -> bool:
        """Every stream was a file that ended, and every frame read went through the model."""
        return all(reader.finished.is_set() for reader in self.readers.values()) and self.hub.drained()

    def wait(self, duration_s: float | None = None) -> str:
        """Block until a stop is requested, the duration passes, or all files are done; says which."""
        deadline = None if duration_s is None else time.monotonic() + duration_s
        while True:
            if self._stop_requested.wait(timeout=0.1):
                return "stop requested" if self._max_frames is None or self._processed < self._max_frames \
                    else "max frames reached"
            if deadline is not None and time.monotonic() >= deadline:
                return "duration reached"
            if self.readers and self.sources_exhausted():
                return "all sources finished"

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._ready.clear()
        for reader in self.readers.values():
            reader.stop()
        for reader in self.readers.values():
            if not reader.join(_READER_JOIN_S):
                log.warning("stream %s: reader did not stop in time; leaving it behind", reader.config.id)
        deadline = time.monotonic() + self._timeouts.drain_s
        while self.worker is not None and not self.hub.drained() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.worker is not None:
            self.worker.stop()
            self.worker.join(self._timeouts.drain_s)
        if self.publisher is not None:
            self.publisher.stop(self._timeouts.kafka_flush_s)
            self.publisher.join(self._timeouts.kafka_flush_s + 3)
        if self.http is not None:
            self.http.stop()
        log.info("stopped after %d processed frame(s)", self._processed)

    def health(self) -> Probe:
        stuck = self.heartbeats.stuck(_STUCK_AFTER_S)
        dead = [
            name
            for name, alive in (
                ("inference", self.worker is None or self.worker.is_alive() or self._stopped),
                ("publisher", self.publisher is None or self.publisher.is_alive() or self._stopped),
            )
            if not alive
        ]
        ok = not stuck and not dead
        return Probe(ok, {"status": "ok" if ok else "failing", "stuck": stuck, "dead": dead})

    def readiness(self) -> Probe:
        now = time.monotonic()
        streams = {}
        for stream_id, reader in self.readers.items():
            last = reader.last_frame_monotonic
            streams[stream_id] = {
                "state": reader.state.value,
                "last_frame_age_s": None if last is None else round(now - last, 3),
            }
        publisher = self.publisher
        body = {
            "ready": self._ready.is_set(),
            "model": None if self.detector is None else {"name": self.detector.name, "device": self.detector.device},
            "kafka": None if publisher is None else {"connected": publisher.connected, "backlog": publisher.backlog()},
            "streams": streams,
        }
        return Probe(self._ready.is_set(), body)

    def stream_states(self) -> dict[str, StreamState]:
        return {stream_id: reader.state for stream_id, reader in self.readers.items()}


def _ultralytics_detector(config: PipelineConfig) -> Detector:
    return UltralyticsDetector(config.model, resolve_device(config.model.device))
