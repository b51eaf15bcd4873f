"""The Kafka publisher: one message per frame result, a bounded spool, and every loss counted.

Why a spool of our own in front of kafka-python's buffer: while the broker is away, `send` blocks, and
a stuck producer (one whose broker lost its producer ids after a restart) never recovers by itself.
Keeping encoded messages here lets the publisher rebuild the producer and resend, and decide exactly
what is dropped when a bound is reached (the oldest, counted as `dropped`).

Counting: `sent` is a message the broker acknowledged; `failed` is a delivery attempt that did not
succeed (the message goes back to the spool and is tried again, unless Kafka will never take it);
`dropped` is a message lost for good (spool overflow, a result that could not be built, a message Kafka
rejects, or still undelivered when a stop's flush deadline passed and there is no spool dir).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Literal, Protocol

from pipeline.analytics import ZoneEvent
from pipeline.config import KafkaConfig
from pipeline.frames import FrameResult
from pipeline.health import Heartbeats
from pipeline.messages import EVENT_HEADERS, HEADERS, build_event, build_message, encode
from pipeline.metrics import PipelineMetrics
from pipeline.snapshots import SnapshotWriter
from pipeline.spool import OutgoingMessage, Spool, discard_undelivered, load_undelivered, save_undelivered

log = logging.getLogger(__name__)

_INBOX_CAPACITY = 256
_MAX_IN_FLIGHT = 1000
_FAILURES_BEFORE_REBUILD = 3
_MAX_UNEXPLAINED_FAILURES = 5
_SETTLE_AFTER_CLOSE_S = 2.0
_FORCE_CLOSE_JOIN_S = 1.0
_REPEATED_ERROR_LOG_S = 10.0
_RESTORED_CHECK_S = 0.5

DeliveryErrorKind = Literal["transient", "rejected", "unexplained"]
_DELIVERY_ERROR_KINDS: tuple[DeliveryErrorKind, ...] = ("transient", "rejected", "unexplained")


def delivery_error_kind(error: BaseException) -> DeliveryErrorKind:
    """Whether sending the same message again can ever succeed.

    `rejected`: Kafka refuses this record or its topic (too large, invalid); every retry fails the same
    way. `transient`: the broker is away or slow, the producer itself is broken (closed, fenced, its
    producer id lost after a broker restart), or vap is not authorised yet (an ACL is the deployment's to
    fix, not the message's); time, a fix or a new producer cures that, so such a failure never costs the
    message while the spool has room. `unexplained`: the rest, non-retriable by kafka-python's own
    `retriable` flag, but not known to be the message's fault (a batch-mate of an invalid record fails so).
    An error reported by the Kafka child process carries the kind the child found.
    """
    from kafka import errors

    reported = getattr(error, "delivery_error_kind", None)
    for kind in _DELIVERY_ERROR_KINDS:
        if reported == kind:
            return kind
    rejected = (
        errors.MessageSizeTooLargeError, errors.RecordListTooLargeError, errors.InvalidRecordError,
        errors.InvalidTimestampError, errors.InvalidTopicError, errors.PolicyViolationError,
        errors.UnsupportedForMessageFormatError,
    )
    if isinstance(error, rejected):
        return "rejected"
    producer_faults = (
        errors.IllegalStateError, errors.UnknownProducerIdError, errors.OutOfOrderSequenceNumberError,
        errors.InvalidProducerEpochError, errors.ProducerFencedError, errors.InvalidProducerIdMappingError,
        errors.TransactionAbortedError,
    )
    waits = (OSError, errors.AuthorizationError, *producer_faults)
    if getattr(error, "retriable", False) or isinstance(error, waits):
        return "transient"
    return "unexplained"


class _RepeatedErrorLog:
    """One log line per interval for a failure that can repeat on every frame; the ones between are counted."""

    def __init__(self, every_s: float = _REPEATED_ERROR_LOG_S) -> None:
        self._every_s = every_s
        self._lock = threading.Lock()
        self._next_at = 0.0
        self._suppressed = 0

    def error(self, message: str, *args: object, exc_info: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if now < self._next_at:
                self._suppressed += 1
                return
            self._next_at = now + self._every_s
            suppressed, self._suppressed = self._suppressed, 0
        if suppressed:
            message += " (and %d more like it since the last report)"
            args = (*args, suppressed)
        log.error(message, *args, exc_info=exc_info)


def _describe(result: FrameResult | ZoneEvent) -> str:
    if isinstance(result, ZoneEvent):
        return f"stream {result.stream_id}, zone event {result.event} in {result.zone_id}"
    return f"stream {result.frame.stream_id}, frame {result.frame.frame_id}"


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
        # Held until their outcome, so that a stop can still keep them when kafka-python never answers.
        self._in_flight: dict[int, OutgoingMessage] = {}
        self._tokens = itertools.count()
        # Messages in flight count against the spool bound too: a dead broker holds them until they fail.
        self._max_in_flight = max(1, min(_MAX_IN_FLIGHT, config.spool.max_messages // 2))
        self._consecutive_failures = 0
        self._producer: Producer | None = None
        self._opening = False
        self._finished = False
        self._drained = False
        self._restored_file_kept = False
        self._next_restored_check = 0.0
        self._generation = 0
        self._retry_at = 0.0
        self._backoff_s = 0.5
        self._stop = threading.Event()
        self._flush_deadline = 0.0
        self._build_errors = _RepeatedErrorLog()
        self._snapshot_errors = _RepeatedErrorLog()
        self._rejections = _RepeatedErrorLog()
        self._loop_errors = _RepeatedErrorLog()
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
                self._restored_file_kept = True
                self._count_dropped(self._spool.put_back(replace(message, restored=True) for message in restored))
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, result: FrameResult | ZoneEvent) -> None:
        """Queue a frame's result or a zone event for publishing; the oldest is dropped if the inbox is full."""
        with self._condition:
            if self._drained:
                self._count_dropped(1)
                return
            if len(self._inbox) >= _INBOX_CAPACITY:
                self._inbox.popleft()
                self._count_dropped(1)
            self._inbox.append(result)
            self._condition.notify_all()

    def backlog(self) -> int:
        """Messages not yet acknowledged: waiting, spooled or in flight."""
        with self._condition:
            return len(self._inbox) + len(self._spool) + len(self._failed_deliveries) + len(self._in_flight)

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
            while not self._turn():
                pass
        finally:
            self._finish()

    def _turn(self) -> bool:
        """One pass of the loop; True once it is time to stop.

        A pass that fails is logged and the loop goes on: results keep arriving, and a publisher thread that
        ended would leave every one of them in the inbox, unsent and uncounted.
        """
        try:
            self._heartbeats.beat(self.thread_name)
            self._spool_inbox()
            self._send_spooled()
            self._forget_restored_file_once_settled()
            if self._stop.is_set() and (self.backlog() == 0 or time.monotonic() >= self._flush_deadline):
                return True
            with self._condition:
                if not self._inbox and not self._failed_deliveries:
                    self._condition.wait(timeout=0.05 if (self._spool or self._in_flight) else 0.2)
        except Exception:
            self._loop_errors.error("publisher loop failed; going on", exc_info=True)
            if self._stop.is_set() and time.monotonic() >= self._flush_deadline:
                return True
            with self._condition:
                self._condition.wait(timeout=0.1)
        return False

    def _finish(self) -> None:
        """Close the producer, wait for what it held to come back, then keep or count what is undelivered.

        kafka-python fails its pending batches back on its own thread once closed; counting them before they
        are back would call dropped the messages a spool dir is there to keep.
        """
        with self._condition:
            self._finished = True
        try:
            self._close_producer(timeout=max(0.0, min(2.0, self._flush_deadline - time.monotonic())))
            self._await_in_flight(_SETTLE_AFTER_CLOSE_S)
        except Exception:
            log.exception("closing the Kafka producer failed")
        try:
            self._keep_or_drop_undelivered()
        finally:
            self._heartbeats.forget(self.thread_name)

    def _await_in_flight(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._condition:
            while self._in_flight and (left := deadline - time.monotonic()) > 0:
                self._condition.wait(timeout=min(left, 0.05))

    def _keep_or_drop_undelivered(self) -> None:
        try:
            self._spool_inbox()
        except Exception:
            log.exception("building the last messages failed")
        with self._condition:
            self._drained = True
            unbuilt = len(self._inbox)
            self._inbox.clear()
            # Oldest first, as the next start resends them: in flight, then failed back, then never sent.
            undelivered = [*self._in_flight.values(), *self._failed_deliveries, *self._spool.drain()]
            self._in_flight.clear()
            self._failed_deliveries = []
        self._count_dropped(unbuilt)
        directory = self._config.spool.dir
        if directory is not None:
            try:
                save_undelivered(directory, undelivered)
            except OSError:
                log.exception("cannot keep %d undelivered message(s) in %s", len(undelivered), directory)
            else:
                if undelivered:
                    log.warning("kept %d undelivered message(s) in %s for the next start", len(undelivered),
                                directory)
                return
        if undelivered:
            log.warning("stopping with %d undelivered message(s); counted as dropped", len(undelivered))
            self._count_dropped(len(undelivered))

    def _forget_restored_file_once_settled(self) -> None:
        """The previous run's spool file stays on disk until every message from it is settled (sent or counted),
        so a crash of this run before then loses none of them (some may be sent twice). Looked at twice a
        second, since it walks the spool."""
        now = time.monotonic()
        if not self._restored_file_kept or now < self._next_restored_check:
            return
        self._next_restored_check = now + _RESTORED_CHECK_S
        with self._condition:
            pending = (*self._spool, *self._in_flight.values(), *self._failed_deliveries)
            if any(message.restored for message in pending):
                return
        self._restored_file_kept = False
        if self._config.spool.dir is not None:
            discard_undelivered(self._config.spool.dir)

    def _spool_inbox(self) -> None:
        with self._condition:
            results = list(self._inbox)
            self._inbox.clear()
            retry, self._failed_deliveries = self._failed_deliveries, []
            dropped = self._spool.put_back(retry)
        for result in results:
            try:
                outgoing = self._build(result)
            except Exception:
                dropped += 1
                self._build_errors.error("cannot build the message for %s; dropped", _describe(result), exc_info=True)
                continue
            with self._condition:
                dropped += self._spool.append(outgoing)
        with self._condition:
            dropped += self._spool.trim_to(self._config.spool.max_messages - len(self._in_flight))
        self._count_dropped(dropped)
        self._metrics.queue_depth.labels(stage="kafka_spool").set(len(self._spool))

    def _build(self, result: FrameResult | ZoneEvent) -> OutgoingMessage:
        if isinstance(result, ZoneEvent):
            encoded = encode(build_event(result, datetime.now(timezone.utc)))
            self._count_zone_event(result)
            return OutgoingMessage(result.stream_id.encode(), encoded, event=True)
        total_s = time.monotonic() - result.frame.captured_monotonic
        message = build_message(result, self._model_name, datetime.now(timezone.utc), total_s * 1000)
        snapshot_uri = self._write_snapshot(result)
        if snapshot_uri is not None:
            message["snapshot"] = {"uri": snapshot_uri}
        outgoing = OutgoingMessage(key=result.frame.stream_id.encode(), value=encode(message))
        series = self._metrics.stream(result.frame.stream_id)
        series.end_to_end_latency.observe(total_s)
        series.frames_processed.inc()
        for detection in message.get("detections", ()):
            series.detections(detection["label"]).inc()
        return outgoing

    def _write_snapshot(self, result: FrameResult) -> str | None:
        """A thumbnail that cannot be written (a full disk, say) costs the picture, not the frame's message."""
        if self._snapshots is None:
            return None
        try:
            return self._snapshots.write(result)
        except Exception:
            self._snapshot_errors.error("cannot write the snapshot for %s; publishing without it",
                                        _describe(result), exc_info=True)
            return None

    def _count_zone_event(self, event: ZoneEvent) -> None:
        self._metrics.stream(event.stream_id).zone_events(event.zone_id, event.event, event.label).inc()

    def _send_spooled(self) -> None:
        producer = self._ensure_producer()
        if producer is None:
            return
        while True:
            with self._condition:
                if len(self._in_flight) >= self._max_in_flight:
                    return
                message = self._spool.popleft()
                if message is None:
                    return
                token = next(self._tokens)
                self._in_flight[token] = message
                generation = self._generation
            sent_at = time.monotonic()
            try:
                topic, headers = (self._events_topic, EVENT_HEADERS) if message.event else (self._config.topic, HEADERS)
                future = producer.send(topic, value=message.value, key=message.key, headers=headers)
            except Exception as error:
                if self._delivery_failed(token, generation, error) != "rejected":
                    return
                continue
            future.add_callback(self._delivered, token, sent_at)
            future.add_errback(self._delivery_failed, token, generation)

    def _delivered(self, token: int, sent_at: float, _metadata: Any) -> None:
        with self._condition:
            if self._in_flight.pop(token, None) is None:
                return  # already kept or counted by a stop that could not wait for it
            self._consecutive_failures = 0
            self.connected = True
            if self._finished:
                self._condition.notify_all()
        self._metrics.kafka_outcomes["sent"].inc()
        self._metrics.kafka_send_latency.observe(time.monotonic() - sent_at)

    def _delivery_failed(self, token: int, generation: int, error: Exception) -> DeliveryErrorKind:
        """Keep the message for another try unless it can never succeed; a producer that keeps failing is rebuilt.

        A message Kafka rejects is dropped at once: retried, it would fail forever and hold up the messages
        behind it. The safety net for failures of no known kind: a message is dropped after
        `_MAX_UNEXPLAINED_FAILURES` of them (each try also counted as `failed`). It cannot cost a message
        during a broker outage: outages and broken producers fail with transient errors (timeouts,
        connection errors, a closed or fenced producer, a lost producer id, the child process gone), which
        never count towards it; five gives a rebuilt producer (after three failures) two more tries.
        Failures of a producer already replaced (its aborted batches) do not count against the new one.
        """
        kind = delivery_error_kind(error)
        with self._condition:
            message = self._in_flight.pop(token, None)
            if message is None:
                return kind
            if kind == "unexplained":
                message = replace(message, unexplained_failures=message.unexplained_failures + 1)
            give_up = kind == "rejected" or message.unexplained_failures >= _MAX_UNEXPLAINED_FAILURES
            if not give_up:
                self._failed_deliveries.append(message)
            if kind != "rejected":
                if generation == self._generation:
                    self._consecutive_failures += 1
                self.connected = False
            self._condition.notify_all()
        self._metrics.kafka_outcomes["failed"].inc()
        if give_up:
            self._count_dropped(1)
            reason = "Kafka will not take" if kind == "rejected" else (
                f"after {message.unexplained_failures} failed tries, giving up on")
            self._rejections.error("%s a %d-byte message of stream %s (%s); dropped", reason,
                                   message.size, message.key.decode(errors="replace"), error)
        else:
            log.debug("delivery failed: %r", error)
        return kind

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
    the sender; the sender is then force-closed here, or its stuck batches would never fail back. A
    force-close only asks the sender thread to abort them: waiting for that thread (briefly) means that on
    return every pending message has failed back to its caller."""
    if producer is None:
        return
    try:
        producer.close(timeout=timeout)
    except Exception as error:
        log.debug("producer close: %r; forcing", error)
    sender = getattr(producer, "_sender", None)
    if sender is not None and sender.is_alive():
        sender.force_close()
        sender.join(_FORCE_CLOSE_JOIN_S)
