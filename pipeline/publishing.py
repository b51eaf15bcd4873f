"""The Kafka publisher: one message per frame result, a bounded spool, and every loss counted.

Why a spool of our own in front of kafka-python's buffer: while the broker is away, `send` blocks and
a stuck producer (one that lost its producer id after a broker restart) never recovers by itself.
Keeping encoded messages here lets the publisher rebuild the producer and resend, and lets it decide
exactly what is dropped when the bound is reached (the oldest, counted as `dropped`).

Counting: `sent` is a message the broker acknowledged; `failed` is a delivery attempt that did not
succeed (the message stays in the spool and is tried again); `dropped` is a message lost for good
(spool overflow, or still unsent when a stop's flush deadline passed).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from pipeline.config import KafkaConfig
from pipeline.frames import FrameResult
from pipeline.health import Heartbeats
from pipeline.messages import HEADERS, build_message, encode
from pipeline.metrics import PipelineMetrics

log = logging.getLogger(__name__)

_INBOX_CAPACITY = 256
_MAX_IN_FLIGHT = 1000
_FAILURES_BEFORE_REBUILD = 3


@dataclass(frozen=True)
class OutgoingMessage:
    key: bytes
    value: bytes


class Producer(Protocol):
    """The part of `kafka.KafkaProducer` the publisher uses."""

    def send(self, topic: str, value: bytes, key: bytes, headers: list[tuple[str, bytes]]) -> Any: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def close(self, timeout: float | None = None) -> None: ...


def kafka_producer_settings(config: KafkaConfig) -> dict[str, Any]:
    """Settings for per-stream order without duplicates on retry (idempotence, acks=all)."""
    acks: int | str = config.acks if config.acks == "all" else int(config.acks)
    return {
        "bootstrap_servers": config.bootstrap_servers.split(","),
        "client_id": config.client_id,
        "acks": acks,
        "compression_type": None if config.compression == "none" else config.compression,
        "linger_ms": config.linger_ms,
        "request_timeout_ms": config.request_timeout_ms,
        "delivery_timeout_ms": config.request_timeout_ms * 2,
        "max_block_ms": 1000,
        "bootstrap_timeout_ms": 2000,
        "max_in_flight_requests_per_connection": 5,
    }


def make_kafka_producer(config: KafkaConfig) -> Producer:
    from kafka import KafkaProducer

    producer: Producer = KafkaProducer(**kafka_producer_settings(config))
    return producer


class KafkaPublisher:
    """Serialises results and delivers them on its own thread; `submit` never blocks the caller."""

    def __init__(
        self,
        config: KafkaConfig,
        model_name: str,
        metrics: PipelineMetrics,
        heartbeats: Heartbeats,
        producer_factory: Callable[[KafkaConfig], Producer] = make_kafka_producer,
    ) -> None:
        self._config = config
        self._model_name = model_name
        self._metrics = metrics
        self._heartbeats = heartbeats
        self._producer_factory = producer_factory
        self._condition = threading.Condition()
        self._inbox: deque[FrameResult] = deque()
        self._spool: deque[OutgoingMessage] = deque()
        self._failed_deliveries: list[OutgoingMessage] = []
        self._in_flight = 0
        self._consecutive_failures = 0
        self._producer: Producer | None = None
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
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, result: FrameResult) -> None:
        with self._condition:
            if len(self._inbox) >= _INBOX_CAPACITY:
                self._inbox.popleft()
                self._metrics.kafka_messages.labels(result="dropped").inc()
            self._inbox.append(result)
            self._condition.notify_all()

    def backlog(self) -> int:
        """Messages not yet acknowledged: waiting, spooled or in flight."""
        with self._condition:
            return len(self._inbox) + len(self._spool) + len(self._failed_deliveries) + self._in_flight

    def stop(self, flush_timeout_s: float) -> None:
        """Deliver what is pending until the deadline, then count the rest as dropped and end."""
        with self._condition:
            self._flush_deadline = time.monotonic() + flush_timeout_s
            self._stop.set()
            self._condition.notify_all()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            while True:
                self._heartbeats.beat(self.thread_name)
                self._encode_inbox()
                self._send_spooled()
                if self._stop.is_set() and (self.backlog() == 0 or time.monotonic() >= self._flush_deadline):
                    break
                with self._condition:
                    if not self._inbox and not self._failed_deliveries:
                        self._condition.wait(timeout=0.05 if (self._spool or self._in_flight) else 0.2)
        except Exception:
            log.exception("publisher failed")
        finally:
            self._close_producer(timeout=max(0.0, min(2.0, self._flush_deadline - time.monotonic())))
            lost = self.backlog()
            if lost:
                log.warning("stopping with %d undelivered messages; counted as dropped", lost)
                self._metrics.kafka_messages.labels(result="dropped").inc(lost)
            self._heartbeats.forget(self.thread_name)

    def _encode_inbox(self) -> None:
        with self._condition:
            results = list(self._inbox)
            self._inbox.clear()
            retry = self._failed_deliveries
            self._failed_deliveries = []
            self._spool.extendleft(reversed(retry))
        for result in results:
            now = datetime.now(timezone.utc)
            total_s = time.monotonic() - result.frame.captured_monotonic
            message = build_message(result, self._model_name, now, total_s * 1000)
            outgoing = OutgoingMessage(key=result.frame.stream_id.encode(), value=encode(message))
            self._metrics.end_to_end_latency.labels(stream=result.frame.stream_id).observe(total_s)
            self._metrics.frames_processed.labels(stream=result.frame.stream_id).inc()
            for label in message.get("detections", ()):
                self._metrics.detections.labels(stream=result.frame.stream_id, label=label["label"]).inc()
            with self._condition:
                self._spool.append(outgoing)
        with self._condition:
            overflow = len(self._spool) - self._config.spool_max_messages
            for _ in range(max(0, overflow)):
                self._spool.popleft()
            spooled = len(self._spool)
        if overflow > 0:
            self._metrics.kafka_messages.labels(result="dropped").inc(overflow)
        self._metrics.queue_depth.labels(stage="kafka_spool").set(spooled)

    def _send_spooled(self) -> None:
        producer = self._ensure_producer()
        if producer is None:
            return
        while True:
            with self._condition:
                if not self._spool or self._in_flight >= _MAX_IN_FLIGHT:
                    return
                message = self._spool.popleft()
                self._in_flight += 1
            sent_at = time.monotonic()
            try:
                future = producer.send(self._config.topic, value=message.value, key=message.key, headers=HEADERS)
            except Exception as error:
                self._delivery_failed(message, error)
                return
            future.add_callback(self._delivered, sent_at)
            future.add_errback(self._delivery_failed_callback, message, self._generation)

    def _delivered(self, sent_at: float, _metadata: Any) -> None:
        self._metrics.kafka_messages.labels(result="sent").inc()
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
        self._metrics.kafka_messages.labels(result="failed").inc()
        with self._condition:
            self._in_flight -= 1
            self._failed_deliveries.append(message)
            if generation is None or generation == self._generation:
                self._consecutive_failures += 1
            self.connected = False
            self._condition.notify_all()
        log.debug("delivery failed: %r", error)

    def _ensure_producer(self) -> Producer | None:
        now = time.monotonic()
        with self._condition:
            failing = self._consecutive_failures >= _FAILURES_BEFORE_REBUILD
        if self._producer is not None and not failing:
            return self._producer
        if now < self._retry_at:
            return None
        if self._producer is not None:
            log.warning("Kafka producer keeps failing; building a new one")
            self._close_producer(timeout=0)
        with self._condition:
            self._consecutive_failures = 0
        self._generation += 1
        try:
            self._producer = self._producer_factory(self._config)
        except Exception as error:
            self._producer = None
            self._retry_at = now + self._backoff_s
            self._backoff_s = min(10.0, self._backoff_s * 2)
            self._count_unreachable(error)
            return None
        self._backoff_s = 0.5
        self._retry_at = 0.0
        return self._producer

    def _count_unreachable(self, error: Exception) -> None:
        with self._condition:
            pending = bool(self._spool)
        if pending:
            self._metrics.kafka_messages.labels(result="failed").inc()
        log.warning("Kafka at %s is unreachable (%s); spooling", self._config.bootstrap_servers, error)

    def _close_producer(self, timeout: float) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            producer.close(timeout=timeout)
        except Exception:
            log.exception("closing the Kafka producer failed")
