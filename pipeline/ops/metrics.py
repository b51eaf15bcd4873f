"""Every Prometheus metric of the pipeline, defined once against an injected registry.

Tests pass a fresh `CollectorRegistry`, so no metric state leaks between runs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pipeline.children import HelperPool

# What a frame can be dropped for (the `reason` label; DESIGN.md's four first). `pipeline.ledger` decides which
# applies; every frame read ends published or dropped for exactly one of these.
DROP_REASONS = (
    "fps_cap",  # above the stream's configured rate
    "decode_error",  # the decoder gave no usable image
    "queue_full",  # the stream's hub buffer was full (live streams keep the freshest)
    "stale",  # waited in the hub past the stream's staleness budget
    "inference_error",  # the model failed on its batch
    "analytics_queue_full",  # the stream's analytics queue was full (live streams keep the freshest)
    "analytics_error",  # the analytics stage could not take it
    "build_error",  # its message could not be built
    "publish_queue_full",  # the publisher's inbox was full
    "spool_full",  # pushed out of the Kafka spool by newer messages while the broker was away
    "publish_rejected",  # Kafka refused the message, or it failed too often for no known reason
    "stream_removed",  # still waiting in a stage when its stream was removed
    "lease_lost",  # fleet mode: read after this replica's group lease ran out (another may run the camera)
    "shutdown",  # still in a stage when a stop's deadline passed
)
KAFKA_RESULTS = ("sent", "failed", "dropped")
SPOOL_LOG_RESULTS = ("written", "unwritten", "recovered")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
_STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
STAGES = ("decode", "queue", "preprocess", "infer", "postprocess", "analytics", "serialize", "publish")
_SEND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


_REMEMBERED_REMOVALS = 1024
_UNEXPORTED_STREAMS = 64


class StreamMetrics:
    """One stream's per-frame series, looked up once: `labels()` costs a few microseconds with a lock, on
    every frame of every stream, and on a GPU host those microseconds hold the GIL the model needs."""

    def __init__(self, metrics: PipelineMetrics, stream_id: str) -> None:
        self.stream_id = stream_id
        self.frames_read = metrics.frames_read.labels(stream=stream_id)
        self.frames_processed = metrics.frames_processed.labels(stream=stream_id)
        self.end_to_end_latency = metrics.end_to_end_latency.labels(stream=stream_id)
        self.up = metrics.stream_up.labels(stream=stream_id)
        self.reconnects = metrics.stream_reconnects.labels(stream=stream_id)
        self.analytics_errors = metrics.analytics_errors.labels(stream=stream_id)
        self.dropped = {reason: metrics.frames_dropped.labels(stream=stream_id, reason=reason)
                        for reason in DROP_REASONS}
        self._metrics = metrics
        self._detections: dict[str, Counter] = {}
        self._zone_events: dict[tuple[str, str, str], Counter] = {}
        self._occupancy: dict[tuple[str, str], Gauge] = {}

    def detections(self, label: str) -> Counter:
        child = self._detections.get(label)
        if child is None:
            child = self._detections[label] = self._metrics.detections.labels(stream=self.stream_id, label=label)
        return child

    def zone_events(self, zone: str, event: str, label: str) -> Counter:
        child = self._zone_events.get((zone, event, label))
        if child is None:
            child = self._zone_events[(zone, event, label)] = self._metrics.zone_events.labels(
                stream=self.stream_id, zone=zone, event=event, label=label)
        return child

    def occupancy(self, zone: str, label: str) -> Gauge:
        child = self._occupancy.get((zone, label))
        if child is None:
            child = self._occupancy[(zone, label)] = self._metrics.zone_occupancy.labels(
                stream=self.stream_id, zone=zone, label=label)
        return child

    def retire(self, sink: PipelineMetrics) -> None:
        """Stops exporting the series this stream created with labels beyond its own id. Frames read before the
        removal still carry this object (`Frame.series`); a label they bring later is created in `sink`, which
        nobody exports, rather than bringing the removed stream back."""
        for label in self._detections:
            self._metrics.detections.remove(self.stream_id, label)
        for key in self._zone_events:
            self._metrics.zone_events.remove(self.stream_id, *key)
        for zone_key in self._occupancy:
            self._metrics.zone_occupancy.remove(self.stream_id, *zone_key)
        self._detections, self._zone_events, self._occupancy = {}, {}, {}
        self._metrics = sink


class PipelineMetrics:
    """The metric names and labels of the design contract."""

    def __init__(self, registry: CollectorRegistry,
                 helpers: Callable[[], dict[str, list[HelperPool]]] | None = None) -> None:
        """`helpers`: the pipeline's pools of helper processes by role (`Pipeline.helpers`), read at each scrape."""
        self.registry = registry
        self._streams: dict[str, StreamMetrics] = {}
        self._streams_lock = threading.Lock()
        self._removed: dict[str, None] = {}  # insertion-ordered, so the oldest can be forgotten
        self._unexported: PipelineMetrics | None = None
        self._unexported_streams = 0
        self._define_stream_metrics(registry)
        self._define_stage_metrics(registry)
        self._define_output_metrics(registry)
        self.build_info = Gauge(
            "vap_build_info", "Version, model and device of this process", ["version", "model", "device"],
            registry=registry,
        )
        self.thread_heartbeat = Gauge(
            "vap_thread_heartbeat_timestamp_seconds", "Last time each pipeline thread's loop turned",
            ["thread"], registry=registry,
        )
        ProcessCollector(registry=registry)
        registry.register(GpuCollector(helpers))
        if helpers is not None:
            registry.register(HelperProcessCollector(helpers))

    def _define_stream_metrics(self, registry: CollectorRegistry) -> None:
        """Per stream: its frames' fates (`pipeline.ledger`), its connection, its latency."""
        self.frames_read = Counter(
            "vap_frames_read_total", "Frames decoded from each stream", ["stream"], registry=registry
        )
        self.frames_dropped = Counter(
            "vap_frames_dropped_total",
            "Frames that will never be published, by reason",
            ["stream", "reason"],
            registry=registry,
        )
        self.frames_processed = Counter(
            "vap_frames_processed_total", "Frames whose result message Kafka acknowledged (published)", ["stream"],
            registry=registry,
        )
        self.stream_up = Gauge(
            "vap_stream_up", "1 while the stream delivers frames, else 0", ["stream"], registry=registry
        )
        self.stream_reconnects = Counter(
            "vap_stream_reconnects_total", "Reconnect attempts after a stream failed", ["stream"],
            registry=registry,
        )
        self.end_to_end_latency = Histogram(
            "vap_end_to_end_latency_seconds", "From frame capture to the message handed to Kafka",
            ["stream"], buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.analytics_errors = Counter(
            "vap_analytics_errors_total",
            "Frames whose tracking or zone step failed; each is published without track ids or events",
            ["stream"], registry=registry,
        )

    def _define_stage_metrics(self, registry: CollectorRegistry) -> None:
        """Where the time goes, and what waits where."""
        self.batch_size = Histogram(
            "vap_batch_size", "Frames per inference batch", ["device"], buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.inference_seconds = Histogram(
            "vap_inference_seconds", "Time of one batch through the model alone (no pre- or post-processing)",
            ["device"], buckets=_INFERENCE_BUCKETS, registry=registry,
        )
        self.queue_depth = Gauge(
            "vap_queue_depth", "Items waiting in each stage's queue", ["stage"], registry=registry
        )
        self.inference_errors = Counter(
            "vap_inference_errors_total", "Batches the model failed on (their frames: dropped, inference_error)",
            ["device"], registry=registry,
        )
        self.stage_seconds = Histogram(
            "vap_stage_seconds", "Time a frame (or, for infer, a batch) spends in each stage", ["stage"],
            buckets=_STAGE_BUCKETS, registry=registry,
        )

    def _define_output_metrics(self, registry: CollectorRegistry) -> None:
        """What goes out: Kafka deliveries, detections and zone events."""
        self.kafka_messages = Counter(
            "vap_kafka_messages_total", "Result messages by delivery outcome", ["result"], registry=registry
        )
        self.kafka_send_latency = Histogram(
            "vap_kafka_send_latency_seconds", "From send to broker acknowledgement",
            buckets=_SEND_BUCKETS, registry=registry,
        )
        self.detections = Counter(
            "vap_detections_total", "Detections published, by class label", ["stream", "label"],
            registry=registry,
        )
        self.zone_events = Counter(
            "vap_zone_events_total", "Zone and line events of tracked objects", ["stream", "zone", "event", "label"],
            registry=registry,
        )
        self.zone_occupancy = Gauge(
            "vap_zone_occupancy", "Tracked objects inside each zone now", ["stream", "zone", "label"],
            registry=registry,
        )
        self.kafka_outcomes = {result: self.kafka_messages.labels(result=result) for result in KAFKA_RESULTS}
        self.snapshot_messages = Counter(
            "vap_snapshot_messages_total", "Pictures for the snapshots topic by outcome (dropped: replaced by a "
            "newer picture of the stream, or the broker was away)", ["result"], registry=registry,
        )
        self.snapshot_outcomes = {result: self.snapshot_messages.labels(result=result) for result in KAFKA_RESULTS}
        self.spool_log_messages_total = Counter(
            "vap_spool_log_messages_total", "Messages of the spool's log on disk (kafka.spool.dir): written; unwritten "
            "(the disk failed: kept in memory only, lost if vap crashes); recovered (read back at start)",
            ["result"], registry=registry,
        )
        self.spool_log_messages = {result: self.spool_log_messages_total.labels(result=result)
                                   for result in SPOOL_LOG_RESULTS}
        self.spool_log_damaged = Counter(
            "vap_spool_log_damaged_total", "Torn or corrupt stretches of the spool's log skipped at start (a crash "
            "mid-write); the messages before each are kept", registry=registry,
        )
        self.spool_log_bytes = Gauge("vap_spool_log_bytes", "Size of the spool's log on disk", registry=registry)
        self.snapshot_write_failures = Counter(
            "vap_snapshot_write_failures_total", "Thumbnails (kafka.snapshots.dir) that could not be written; their "
            "messages went out without a link", registry=registry,
        )

    def add_stream(self, stream_id: str) -> None:
        """Create a stream's label sets at start, so dashboards see zeros rather than gaps."""
        with self._streams_lock:
            self._removed.pop(stream_id, None)
        self.stream(stream_id).up.set(0)

    def stream(self, stream_id: str) -> StreamMetrics:
        """The stream's series. A stage still working for a removed stream (a reader stuck in a blocking open,
        a result still in flight) gets series nobody exports: it must not bring the removed stream's series
        back, nor touch those of a new stream added under the same id."""
        series = self._streams.get(stream_id)
        if series is not None:
            return series
        with self._streams_lock:
            if stream_id in self._removed:
                return StreamMetrics(self._sink(), stream_id)
            return self._streams.setdefault(stream_id, StreamMetrics(self, stream_id))

    def _sink(self) -> PipelineMetrics:
        """Series nobody exports, for removed streams. A fresh one now and then: one per removed id would grow
        with every stream ever removed. Call with the streams lock held."""
        if self._unexported is None or self._unexported_streams >= _UNEXPORTED_STREAMS:
            self._unexported, self._unexported_streams = PipelineMetrics(CollectorRegistry()), 0
        self._unexported_streams += 1
        return self._unexported

    def remove_stream(self, stream_id: str) -> None:
        with self._streams_lock:
            self._removed[stream_id] = None
            while len(self._removed) > _REMEMBERED_REMOVALS:
                del self._removed[next(iter(self._removed))]
            series = self._streams.pop(stream_id, None)
            if series is not None:
                series.retire(self._sink())
            for metric in (self.frames_read, self.frames_processed, self.stream_up, self.stream_reconnects,
                           self.end_to_end_latency, self.analytics_errors):
                metric.remove(stream_id)
            for reason in DROP_REASONS:
                self.frames_dropped.remove(stream_id, reason)


class HelperProcessCollector(Collector):
    """The helper processes of each kind, read at scrape time. How many run now: a kind that keeps dying (replaced
    after a pause that grows) or cannot start shows below its setting. How many were replaced: a worker that dies
    and is replaced at once is missing from the first for a moment only, and shows in the second."""

    def __init__(self, helpers: Callable[[], dict[str, list[HelperPool]]]) -> None:
        self._helpers = helpers

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        running = GaugeMetricFamily("vap_helper_processes", "Helper processes running now: the Kafka client, "
                                    "decoders, polygon, message and analytics workers", labels=["kind"])
        replaced = CounterMetricFamily("vap_helper_replacements", "Helper processes that died or stopped "
                                       "answering and were replaced", labels=["kind"])
        for role, pools in self._helpers().items():
            running.add_metric([helper_kind(role)], float(sum(len(pool.pids) for pool in pools)))
            replaced.add_metric([helper_kind(role)], float(sum(pool.replacements for pool in pools)))
        yield running
        yield replaced


def helper_kind(role: str) -> str:
    """The label of a helper role: "Kafka client process" is kafka_client, "analytics processes" analytics."""
    return role.lower().removesuffix(" processes").removesuffix(" process").replace(" ", "_")


class GpuCollector(Collector):
    """GPU memory and utilisation per CUDA device, read at scrape time; nothing on machines without one. The
    memory is vap's: this process's, and what its inference processes (`model.inference_process`) last said
    they hold, read from the helper pools that report it (`device`, `device_reserved_bytes`)."""

    def __init__(self, helpers: Callable[[], dict[str, list[HelperPool]]] | None = None) -> None:
        self._helpers = helpers

    def _helpers_memory(self) -> dict[str, float]:
        held: dict[str, float] = {}
        for pools in ({} if self._helpers is None else self._helpers()).values():
            for pool in pools:
                device, reserved = getattr(pool, "device", None), getattr(pool, "device_reserved_bytes", None)
                if isinstance(device, str) and reserved is not None:
                    held[device] = held.get(device, 0.0) + float(reserved)
        return held

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            import torch
        except ImportError:
            return
        if not torch.cuda.is_available():
            return
        memory = GaugeMetricFamily("vap_gpu_memory_bytes", "GPU memory held by vap: this process and its "
                                   "inference processes", labels=["device"])
        helpers = self._helpers_memory()
        utilisation = GaugeMetricFamily(
            "vap_gpu_utilization_ratio", "GPU busy fraction over the last sample period (NVML)", labels=["device"]
        )
        for index in range(torch.cuda.device_count()):
            device = f"cuda:{index}"
            memory.add_metric([device], float(torch.cuda.memory_reserved(index)) + helpers.get(device, 0.0))
            with contextlib.suppress(Exception):  # NVML missing: memory alone is still worth exporting
                utilisation.add_metric([device], torch.cuda.utilization(index) / 100.0)
        yield memory
        yield utilisation
