"""The Kafka publisher: one message per frame result, a bounded spool, and every loss counted.

Why a spool of our own in front of kafka-python's buffer: while the broker is away, `send` blocks, and
a stuck producer (one whose broker lost its producer ids after a restart) never recovers by itself.
Keeping encoded messages here lets the publisher rebuild the producer and resend, and decide exactly
what is dropped when a bound is reached (the oldest, counted as `dropped`).

Counting: `sent` is a message the broker acknowledged; `failed` is a delivery attempt that did not
succeed (the message goes back to the spool and is tried again); `dropped` is a message lost for good
(spool overflow, or still undelivered when a stop's flush deadline passed and there is no spool dir).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Protocol

from pipeline.analytics import ZoneEvent
from pipeline.config import KafkaConfig
from pipeline.frames import FrameResult
from pipeline.health import Heartbeats
from pipeline.messages import EVENT_HEADERS, HEADERS, build_event, build_message, encode
from pipeline.metrics import PipelineMetrics
from pipeline.snapshots import SnapshotWriter
from pipeline.spool import OutgoingMessage, Spool, load_undelivered, save_undelivered

log = logging.getLogger(__name__)

_INBOX_CAPACITY = 256
_MAX_IN_FLIGHT = 1000
_FAILURES_BEFORE_REBUILD = 3


class Producer(Protocol):
    """The part of `kafka.KafkaProducer` the publisher uses."""

    def send(self, topic: str, value: bytes, key: bytes, headers: list[tuple[str, bytes]]) -> Any: ...

    def close(self, timeout: float | None = None) -> None: ...


def kafka_client_settings(config: KafkaConfig) -> dict[str, Any]:
    """Connection and security settings shared by producers, admin clients and consumers."""
    settings: dict[str, Any] = {
        "bootstrap_servers": config.bootstrap_servers.split(","),
        "client_id": config.client_id,
        "security_protocol": config.security_protocol,
        "request_timeout_ms": config.request_timeout_ms,
    }
    if config.sasl_mechanism is not None and config.sasl_password is not None:
        settings["sasl_mechanism"] = config.sasl_mechanism
        settings["sasl_plain_username"] = config.sasl_username
        settings["sasl_plain_password"] = config.sasl_password.get_secret_value()
    if config.security_protocol in ("SSL", "SASL_SSL"):
        settings["ssl_check_hostname"] = config.ssl_check_hostname
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(config, name)
            if value is not None:
                settings[name] = str(value)
    return settings


def kafka_producer_settings(config: KafkaConfig) -> dict[str, Any]:
    """Per-stream order without duplicates on retry: acks=all, idempotence, at most 5 requests in flight."""
    acks: int | str = config.acks if config.acks == "all" else int(config.acks)
    return {
        **kafka_client_settings(config),
        "acks": acks,
        "enable_idempotence": acks in ("all", -1),
        "compression_type": None if config.compression == "none" else config.compression,
        "linger_ms": config.linger_ms,
        "delivery_timeout_ms": config.request_timeout_ms * 2,
        "max_block_ms": 1000,
        "bootstrap_timeout_ms": 2000,
        "max_in_flight_requests_per_connection": 5,
    }


def make_kafka_producer(config: KafkaConfig) -> Producer:
    from kafka import KafkaProducer

    ensure_topic(config)
    producer: Producer = KafkaProducer(**kafka_producer_settings(config))
    return producer


def ensure_topic(config: KafkaConfig) -> None:
    """Create the topic when it is missing and allowed; say clearly what to do when it is not."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(**kafka_client_settings(config), bootstrap_timeout_ms=2000)
    try:
        if config.topic in admin.list_topics():
            return
        if not config.create_topic:
            log.error("Kafka topic '%s' does not exist and kafka.create_topic is false: create it on the "
                      "cluster or allow vap to create it", config.topic)
            return
        try:
            admin.create_topics([NewTopic(config.topic, config.partitions, config.replication)])
            log.info("created Kafka topic '%s' (%d partitions, replication %d)", config.topic, config.partitions,
                     config.replication)
        except TopicAlreadyExistsError:
            pass
    finally:
        admin.close()


class KafkaPublisher:
    """Serialises results and delivers them on its own thread; `submit` never blocks the caller."""

    def __init__(
        self,
        config: KafkaConfig,
        model_name: str,
        metrics: PipelineMetrics,
        heartbeats: Heartbeats,
        producer_factory: Callable[[KafkaConfig], Producer] = make_kafka_producer,
        events_topic: str = "vap.events",
    ) -> None:
        self._config = config
        self._events_topic = events_topic
        self._model_name = model_name
        self._metrics = metrics
        self._heartbeats = heartbeats
        self._producer_factory = producer_factory
        self._condition = threading.Condition()
        self._inbox: deque[FrameResult | ZoneEvent] = deque()
        self._spool = Spool(config.spool.max_messages, config.spool.max_bytes)
        self._snapshots = SnapshotWriter(config.snapshots) if config.snapshots.dir is not None else None
        self._failed_deliveries: list[OutgoingMessage] = []
        self._in_flight = 0
        # Messages in flight count against the spool bound too: a dead broker holds them until they fail.
        self._max_in_flight = max(1, min(_MAX_IN_FLIGHT, config.spool.max_messages // 2))
        self._consecutive_failures = 0
        self._producer: Producer | None = None
        self._opening = False
        self._finished = False
        self._generation = 0
        self._retry_at = 0.0
        self._backoff_s = 0.5
        self._stop = threading.Event()
        self._flush_deadline = 0.0
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self.connected = False

    @property
    def thread_name(self) -> str:
        return self._thread.name

    def start(self) -> None:
        if self._config.spool.dir is not None:
            restored = load_undelivered(self._config.spool.dir)
            if restored:
                log.info("resending %d message(s) left undelivered by the previous run", len(restored))
                self._count_dropped(self._spool.put_back(restored))
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, result: FrameResult | ZoneEvent) -> None:
        """Queue a frame's result or a zone event for publishing; the oldest is dropped if the inbox is full."""
        with self._condition:
            if len(self._inbox) >= _INBOX_CAPACITY:
                self._inbox.popleft()
                self._count_dropped(1)
            self._inbox.append(result)
            self._condition.notify_all()

    def backlog(self) -> int:
        """Messages not yet acknowledged: waiting, spooled or in flight."""
        with self._condition:
            return len(self._inbox) + len(self._spool) + len(self._failed_deliveries) + self._in_flight

    def stop(self, flush_timeout_s: float) -> None:
        """Deliver what is pending until the deadline, then keep (spool dir) or count as dropped the rest."""
        with self._condition:
            self._flush_deadline = time.monotonic() + flush_timeout_s
            self._stop.set()
            self._condition.notify_all()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _count_dropped(self, count: int) -> None:
        if count:
            self._metrics.kafka_outcomes["dropped"].inc(count)

    def _run(self) -> None:
        try:
            while True:
                self._heartbeats.beat(self.thread_name)
                self._spool_inbox()
                self._send_spooled()
                if self._stop.is_set() and (self.backlog() == 0 or time.monotonic() >= self._flush_deadline):
                    break
                with self._condition:
                    if not self._inbox and not self._failed_deliveries:
                        self._condition.wait(timeout=0.05 if (self._spool or self._in_flight) else 0.2)
        except Exception:
            log.exception("publisher failed")
        finally:
            with self._condition:
                self._finished = True
            self._close_producer(timeout=max(0.0, min(2.0, self._flush_deadline - time.monotonic())))
            self._keep_or_drop_undelivered()
            self._heartbeats.forget(self.thread_name)

    def _keep_or_drop_undelivered(self) -> None:
        self._spool_inbox()
        with self._condition:
            undelivered = self._spool.drain()
            lost_in_flight = self._in_flight
        if self._config.spool.dir is not None:
            save_undelivered(self._config.spool.dir, undelivered)
            if undelivered:
                log.warning("kept %d undelivered message(s) in %s for the next start", len(undelivered),
                            self._config.spool.dir)
            undelivered = []
        lost = len(undelivered) + lost_in_flight
        if lost:
            log.warning("stopping with %d undelivered message(s); counted as dropped", lost)
            self._count_dropped(lost)

    def _spool_inbox(self) -> None:
        with self._condition:
            results = list(self._inbox)
            self._inbox.clear()
            retry, self._failed_deliveries = self._failed_deliveries, []
            dropped = self._spool.put_back(retry)
        for result in results:
            if isinstance(result, ZoneEvent):
                self._count_zone_event(result)
                encoded = encode(build_event(result, datetime.now(timezone.utc)))
                with self._condition:
                    dropped += self._spool.append(OutgoingMessage(result.stream_id.encode(), encoded, event=True))
                continue
            total_s = time.monotonic() - result.frame.captured_monotonic
            message = build_message(result, self._model_name, datetime.now(timezone.utc), total_s * 1000)
            snapshot_uri = self._snapshots.write(result) if self._snapshots is not None else None
            if snapshot_uri is not None:
                message["snapshot"] = {"uri": snapshot_uri}
            outgoing = OutgoingMessage(key=result.frame.stream_id.encode(), value=encode(message))
            series = self._metrics.stream(result.frame.stream_id)
            series.end_to_end_latency.observe(total_s)
            series.frames_processed.inc()
            for detection in message.get("detections", ()):
                series.detections(detection["label"]).inc()
            with self._condition:
                dropped += self._spool.append(outgoing)
        with self._condition:
            dropped += self._spool.trim_to(self._config.spool.max_messages - self._in_flight)
        self._count_dropped(dropped)
        self._metrics.queue_depth.labels(stage="kafka_spool").set(len(self._spool))

    def _count_zone_event(self, event: ZoneEvent) -> None:
        self._metrics.zone_events.labels(
            stream=event.stream_id, zone=event.zone_id, event=event.event, label=event.label
        ).inc()

    def _send_spooled(self) -> None:
        producer = self._ensure_producer()
        if producer is None:
            return
        while True:
            with self._condition:
                if self._in_flight >= self._max_in_flight:
                    return
                message = self._spool.popleft()
                if message is None:
                    return
                self._in_flight += 1
            sent_at = time.monotonic()
            try:
                topic, headers = (self._events_topic, EVENT_HEADERS) if message.event else (self._config.topic, HEADERS)
                future = producer.send(topic, value=message.value, key=message.key, headers=headers)
            except Exception as error:
                self._delivery_failed(message, error)
                return
            future.add_callback(self._delivered, sent_at)
            future.add_errback(self._delivery_failed_callback, message, self._generation)

    def _delivered(self, sent_at: float, _metadata: Any) -> None:
        self._metrics.kafka_outcomes["sent"].inc()
        self._metrics.kafka_send_latency.observe(time.monotonic() - sent_at)
        with self._condition:
            self._in_flight -= 1
            self._consecutive_failures = 0
            self.connected = True

    def _delivery_failed_callback(self, message: OutgoingMessage, generation: int, error: Exception) -> None:
        self._delivery_failed(message, error, generation)

    def _delivery_failed(self, message: OutgoingMessage, error: Exception, generation: int | None = None) -> None:
        """Keep the message for another try; a producer that keeps failing is rebuilt.

        Failures of a producer already replaced (its aborted batches) do not count against the new one.
        """
        self._metrics.kafka_outcomes["failed"].inc()
        with self._condition:
            self._in_flight -= 1
            self._failed_deliveries.append(message)
            if generation is None or generation == self._generation:
                self._consecutive_failures += 1
            self.connected = False
            self._condition.notify_all()
        log.debug("delivery failed: %r", error)

    def _ensure_producer(self) -> Producer | None:
        """The current producer, or None while one is being opened (on its own thread, so results keep
        moving into the spool and being counted while a broker is slow to answer or away)."""
        now = time.monotonic()
        with self._condition:
            if self._opening:
                return None
            failing = self._consecutive_failures >= _FAILURES_BEFORE_REBUILD
            if self._producer is not None and not failing:
                return self._producer
            if now < self._retry_at:
                return None
        with self._condition:
            failed, self._producer = self._producer, None
            self._consecutive_failures = 0
            self._generation += 1
            self._opening = True
        if failed is not None:
            log.warning("Kafka producer keeps failing; building a new one")
        threading.Thread(target=self._open_producer, args=(failed,), name="kafka-open", daemon=True).start()
        return None

    def _open_producer(self, failed: Producer | None) -> None:
        close_kafka_producer(failed, 0)
        try:
            producer = self._producer_factory(self._config)
        except Exception as error:
            with self._condition:
                self._opening = False
                self._retry_at = time.monotonic() + self._backoff_s
                self._backoff_s = min(10.0, self._backoff_s * 2)
                self._condition.notify_all()
            self._count_unreachable(error)
            return
        with self._condition:
            self._opening = False
            orphan = producer if self._finished else None
            if orphan is None:
                self._producer = producer
                self._backoff_s = 0.5
                self._retry_at = 0.0
                self._condition.notify_all()
        close_kafka_producer(orphan, 0)

    def _count_unreachable(self, error: Exception) -> None:
        with self._condition:
            pending = len(self._spool) > 0
        if pending:
            self._metrics.kafka_outcomes["failed"].inc()
        log.warning("Kafka at %s is unreachable (%s); spooling", self._config.bootstrap_servers, error)

    def _close_producer(self, timeout: float) -> None:
        """Close within `timeout`; pending batches are aborted, so their messages go back to the spool."""
        with self._condition:
            producer, self._producer = self._producer, None
        close_kafka_producer(producer, timeout)


def close_kafka_producer(producer: Producer | None, timeout: float) -> None:
    """kafka-python's `close` flushes first and raises when the flush times out, before it force-closes
    the sender; the sender is then force-closed here, or its stuck batches would never fail back."""
    if producer is None:
        return
    try:
        producer.close(timeout=timeout)
    except Exception as error:
        log.debug("producer close: %r; forcing", error)
        sender = getattr(producer, "_sender", None)
        if sender is not None and sender.is_alive():
            sender.force_close()
