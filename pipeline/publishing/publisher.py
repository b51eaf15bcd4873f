"""The Kafka publisher: one message per frame result, a bounded spool, and every loss counted.

Why a spool of our own in front of kafka-python's buffer: while the broker is away, `send` blocks, and
a stuck producer (one whose broker lost its producer ids after a restart) never recovers by itself.
Keeping encoded messages here lets the publisher rebuild the producer and resend, and decide exactly
what is dropped when a bound is reached (the oldest, counted as `dropped`).

Counting: `sent` is a message the broker acknowledged; `failed` is a delivery attempt that did not
succeed (the message goes back to the spool and is tried again, unless Kafka will never take it);
`dropped` is a message lost for good (spool overflow, a result that could not be built, a message Kafka
rejects or larger than the spool's byte bound, a zone event whose topic is missing and may not be created,
or still undelivered when a stop's flush deadline passed and there is no spool dir).

Order: after a result's delivery fails, nothing more goes to that producer until every message it holds
has come back, and failed messages are resent oldest first (see `pipeline.publishing.spool`), so a retry does not
overtake the messages of its stream sent after it. Zone events go to a topic of their own, and a problem with
that topic (missing, not yet created) holds up only the events, never the frame results.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Literal

from pipeline.analytics.zones import ZoneEvent
from pipeline.config import KafkaConfig
from pipeline.frames import FrameResult
from pipeline.ops.health import Heartbeats
from pipeline.ops.metrics import PipelineMetrics
from pipeline.publishing.kafka_client import (
    DeliveryErrorKind,
    Producer,
    close_kafka_producer,
    delivery_error_kind,
    delivery_timeout_ms,
    ensure_topic,
    make_kafka_producer,
)
from pipeline.publishing.messages import EVENT_HEADERS, HEADERS, build_event, build_message, encode
from pipeline.publishing.snapshots import SnapshotWriter
from pipeline.publishing.spool import OutgoingMessage, Spool, discard_undelivered, load_undelivered, save_undelivered

log = logging.getLogger(__name__)

_INBOX_CAPACITY = 256
_MAX_IN_FLIGHT = 1000
_FAILURES_BEFORE_REBUILD = 3
_MAX_UNEXPLAINED_FAILURES = 5
_SETTLE_AFTER_CLOSE_S = 2.0
_REPEATED_ERROR_LOG_S = 10.0
_RESTORED_CHECK_S = 0.5
_EVENTS_FIRST_BACKOFF_S = 1.0
_EVENTS_MAX_BACKOFF_S = 30.0
_MISSING_TOPIC_RECHECK_S = 30.0
_SILENT_AFTER_S = 5.0  # no outcome for this long with messages in flight: the broker is not there
_OVERFLOW_MEMORY_S = 5.0  # how long a spool overflow keeps vap unready


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


@dataclass(frozen=True, slots=True)
class _InFlight:
    message: OutgoingMessage
    generation: int
    sent_at: float


@dataclass
class _EventsTopic:
    """Whether zone events may go out now.

    `unchecked` -> `checking` (the topic is looked up, and created like the results topic, on a thread of
    its own) -> `ready`, or `missing` when it is not there and may not be created. A failed event sends it
    back to `unchecked` after a backoff, and the next try sends one event alone (`probing`): with the
    topic's metadata missing, each send blocks the Kafka client for max_block_ms.
    """

    state: Literal["unchecked", "checking", "ready", "missing"] = "unchecked"
    not_before: float = 0.0
    backoff_s: float = _EVENTS_FIRST_BACKOFF_S
    probing: bool = True
    in_flight: int = 0

    def may_send(self, now: float, flushing: bool = False) -> bool:
        """While a stop flushes, the backoff no longer holds events back: it is their last chance."""
        due = flushing or now >= self.not_before
        return self.state == "ready" and due and not (self.probing and self.in_flight)

    def delivered(self) -> None:
        self.probing = False
        self.backoff_s = _EVENTS_FIRST_BACKOFF_S

    def failed(self, now: float) -> None:
        """Events that were in flight together fail together: only the first failure of a round moves the
        backoff on, or one blip would leave the events waiting the longest backoff."""
        if self.state == "ready":
            self.state = "unchecked"
        self.probing = True
        if now >= self.not_before:
            self.not_before = now + self.backoff_s
            self.backoff_s = min(_EVENTS_MAX_BACKOFF_S, self.backoff_s * 2)


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
        topic_setup: Callable[[KafkaConfig, str], bool] = ensure_topic,
    ) -> None:
        self._config = config
        self._events_topic = events_topic
        self._model_name = model_name
        self._metrics = metrics
        self._heartbeats = heartbeats
        self._producer_factory = producer_factory
        self._topic_setup = topic_setup
        self._condition = threading.Condition()
        self._inbox: deque[FrameResult | ZoneEvent] = deque()
        self._spool = Spool(config.spool.max_messages, config.spool.max_bytes)
        self._snapshots = SnapshotWriter(config.snapshots) if config.snapshots.dir is not None else None
        self._sequence = itertools.count()
        self._failed_deliveries: list[OutgoingMessage] = []
        # Held until their outcome, so that a stop can still keep them when kafka-python never answers.
        self._in_flight: dict[int, _InFlight] = {}
        self._in_flight_bytes = 0
        self._tokens = itertools.count()
        # At most half of each spool bound in flight: while deliveries fail, both count against the bounds.
        self._max_in_flight = max(1, min(_MAX_IN_FLIGHT, config.spool.max_messages // 2))
        self._max_in_flight_bytes = config.spool.max_bytes // 2
        # kafka-python fails a message itself after its delivery timeout; a producer that has given no outcome
        # for much longer than that is stuck. Longer than the Kafka child's own watchdog (twice the delivery
        # timeout), which replaces a stuck child first.
        self._stuck_after_s = 2.5 * delivery_timeout_ms(config) / 1000
        self._last_outcome_at = time.monotonic()
        self._consecutive_failures = 0
        self._failing = False
        self._draining = False
        self._events = _EventsTopic()
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
        self._events_errors = _RepeatedErrorLog()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._connected = False
        self._overflowed_at: float | None = None

    @property
    def connected(self) -> bool:
        """Whether the broker acknowledges messages: the last delivery succeeded and the broker has not gone
        silent since. A broker that died answers nothing, and kafka-python fails the messages it holds only
        after its request timeout (about half a minute), so silence is the first sign."""
        with self._condition:
            return self._connected and self._stuck_for(time.monotonic()) < _SILENT_AFTER_S

    def overflowing(self) -> bool:
        """Whether messages are being lost to the spool's bounds: it dropped one lately, or the broker is away
        and the backlog has reached the bound. With the broker there, a backlog over the bound is only messages
        in flight, which do not count against it."""
        with self._condition:
            at = self._overflowed_at
        if at is not None and time.monotonic() - at < _OVERFLOW_MEMORY_S:
            return True
        return not self.connected and self.backlog() >= self._config.spool.max_messages

    @property
    def thread_name(self) -> str:
        return self._thread.name

    def start(self) -> None:
        if self._config.spool.dir is not None:
            restored = load_undelivered(self._config.spool.dir)
            if restored:
                log.info("resending %d message(s) left undelivered by the previous run", len(restored))
                self._restored_file_kept = True
                self._count_dropped(self._spool.put_back(
                    replace(message, restored=True, sequence=next(self._sequence)) for message in restored))
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
            # Oldest first, as the next start resends them in this order.
            undelivered = sorted([*(record.message for record in self._in_flight.values()), *self._failed_deliveries,
                                  *self._spool.drain()], key=lambda message: message.sequence)
            self._in_flight.clear()
            self._in_flight_bytes = self._events.in_flight = 0
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
            pending = (*self._spool, *(record.message for record in self._in_flight.values()),
                       *self._failed_deliveries)
            if any(message.restored for message in pending):
                return
        self._restored_file_kept = False
        if self._config.spool.dir is not None:
            discard_undelivered(self._config.spool.dir)

    def _spool_inbox(self) -> None:
        """Build what arrived and spool it within the bounds.

        While deliveries fail, the messages in flight count against the bounds too (a dead broker holds them
        until they fail back); while they succeed they do not, so a healthy broker never costs a message,
        however small the bounds.
        """
        max_bytes = self._config.spool.max_bytes
        with self._condition:
            results = list(self._inbox)
            self._inbox.clear()
            retry, self._failed_deliveries = self._failed_deliveries, []
            overflowed = self._spool.put_back(retry)
        dropped = 0
        for result in results:
            try:
                outgoing = self._build(result)
            except Exception:
                dropped += 1
                self._build_errors.error("cannot build the message for %s; dropped", _describe(result), exc_info=True)
                continue
            if outgoing.size > max_bytes:
                dropped += 1
                self._rejections.error("the %d-byte message of %s is larger than kafka.spool.max_bytes (%d); dropped",
                                       outgoing.size, _describe(result), max_bytes)
                continue
            with self._condition:
                overflowed += self._spool.append(outgoing)
        with self._condition:
            held, held_bytes = (len(self._in_flight), self._in_flight_bytes) if self._failing else (0, 0)
            overflowed += self._spool.trim_to(self._config.spool.max_messages - held, max_bytes - held_bytes)
            if overflowed:
                self._overflowed_at = time.monotonic()
        self._count_dropped(dropped + overflowed)
        self._metrics.queue_depth.labels(stage="kafka_spool").set(len(self._spool))

    def _build(self, result: FrameResult | ZoneEvent) -> OutgoingMessage:
        if isinstance(result, ZoneEvent):
            encoded = encode(build_event(result, datetime.now(timezone.utc)))
            self._count_zone_event(result)
            return OutgoingMessage(result.stream_id.encode(), encoded, event=True, sequence=next(self._sequence))
        total_s = time.monotonic() - result.frame.captured_monotonic
        message = build_message(result, self._model_name, datetime.now(timezone.utc), total_s * 1000)
        snapshot_uri = self._write_snapshot(result)
        if snapshot_uri is not None:
            message["snapshot"] = {"uri": snapshot_uri}
        outgoing = OutgoingMessage(key=result.frame.stream_id.encode(), value=encode(message),
                                   sequence=next(self._sequence))
        series = result.frame.series or self._metrics.stream(result.frame.stream_id)
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
        self._look_after_events_topic()
        while True:
            now = time.monotonic()
            with self._condition:
                # A failure not yet put back in the spool must not be overtaken by the messages after it.
                if self._failed_deliveries or (self._draining and self._in_flight):
                    return
                self._draining = False
                if len(self._in_flight) >= self._max_in_flight or self._in_flight_bytes >= self._max_in_flight_bytes:
                    return
                message = self._spool.popleft(events=self._events.may_send(now, flushing=self._stop.is_set()))
                if message is None:
                    return
                token = next(self._tokens)
                self._in_flight[token] = _InFlight(message, self._generation, now)
                self._in_flight_bytes += message.size
                self._events.in_flight += message.event
            try:
                topic, headers = (self._events_topic, EVENT_HEADERS) if message.event else (self._config.topic, HEADERS)
                future = producer.send(topic, value=message.value, key=message.key, headers=headers)
            except Exception as error:
                if self._delivery_failed(token, error) == "rejected" or message.event:
                    continue
                return
            future.add_callback(self._delivered, token)
            future.add_errback(self._delivery_failed, token)

    def _take_in_flight(self, token: int) -> _InFlight | None:
        """Called holding the lock, for an outcome."""
        record = self._in_flight.pop(token, None)
        if record is not None:
            self._in_flight_bytes -= record.message.size
            self._events.in_flight -= record.message.event
            self._last_outcome_at = time.monotonic()
        return record

    def _delivered(self, token: int, _metadata: Any) -> None:
        with self._condition:
            record = self._take_in_flight(token)
            if record is None:
                return  # already kept, counted or taken back by a stop or a rebuild that could not wait for it
            if record.message.event:
                self._events.delivered()
            else:
                self._consecutive_failures = 0
                self._failing = False
                self._connected = True
            if self._finished:
                self._condition.notify_all()
        self._metrics.kafka_outcomes["sent"].inc()
        self._metrics.kafka_send_latency.observe(time.monotonic() - record.sent_at)

    def _delivery_failed(self, token: int, error: Exception) -> DeliveryErrorKind:
        """Keep the message for another try unless it can never succeed; a producer that keeps failing is rebuilt.

        A message Kafka rejects is dropped at once: retried, it would fail forever and hold up the messages
        behind it. The safety net for failures of no known kind: a message is dropped after
        `_MAX_UNEXPLAINED_FAILURES` of them (each try also counted as `failed`). It cannot cost a message
        during a broker outage: outages and broken producers fail with transient errors (timeouts,
        connection errors, a closed or fenced producer, a lost producer id, the child process gone), which
        never count towards it; five gives a rebuilt producer (after three failures) two more tries.
        Failures of a producer already replaced (its aborted batches) do not count against the new one.
        A failed result stops sends to the producer until what it holds has come back (`_draining`), so
        the retry goes out before the newer messages of its stream; a failed event backs off its own topic.
        """
        kind = delivery_error_kind(error)
        with self._condition:
            record = self._take_in_flight(token)
            if record is None:
                return kind
            message = record.message
            if kind == "unexplained":
                message = replace(message, unexplained_failures=message.unexplained_failures + 1)
            give_up = kind == "rejected" or message.unexplained_failures >= _MAX_UNEXPLAINED_FAILURES
            if not give_up:
                self._failed_deliveries.append(message)
            if kind != "rejected":
                if message.event:
                    if record.generation == self._generation:  # not one aborted with a producer replaced since
                        self._events.failed(time.monotonic())
                else:
                    if record.generation == self._generation:
                        self._consecutive_failures += 1
                        self._draining = True
                    self._failing = True
                    self._connected = False
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

    def _look_after_events_topic(self) -> None:
        """Zone events wait until their topic is known to be there (looked up, or created, on another thread);
        when it is missing and may not be created, they are dropped and counted rather than kept for ever."""
        now = time.monotonic()
        dropped: list[OutgoingMessage] = []
        with self._condition:
            events = self._events
            if events.state == "missing":
                if now < events.not_before:
                    dropped = self._spool.take_events()
                else:
                    events.state = "unchecked"
            due = now >= events.not_before or self._stop.is_set()
            check = events.state == "unchecked" and due and self._spool.has_events
            if check:
                events.state = "checking"
        if dropped:
            self._count_dropped(len(dropped))
            self._events_errors.error("Kafka topic '%s' (tracking.events_topic) does not exist and vap may not "
                                      "create it (kafka.create_topic); %d zone event(s) dropped",
                                      self._events_topic, len(dropped))
        if check:
            threading.Thread(target=self._check_events_topic, name="kafka-topic", daemon=True).start()

    def _check_events_topic(self) -> None:
        try:
            there = self._topic_setup(self._config, self._events_topic)
        except Exception as error:
            with self._condition:
                self._events.state = "unchecked"
                self._events.failed(time.monotonic())
            self._events_errors.error("cannot look up Kafka topic '%s' (%s); zone events wait", self._events_topic,
                                      error)
            return
        with self._condition:
            self._events.state = "ready" if there else "missing"
            if not there:
                self._events.not_before = time.monotonic() + _MISSING_TOPIC_RECHECK_S
            self._condition.notify_all()

    def _stuck_for(self, now: float) -> float:
        """Called holding the lock: how long the oldest message in flight has waited with no outcome of any
        message since; 0 when nothing is in flight."""
        oldest = next(iter(self._in_flight.values()), None)
        return 0.0 if oldest is None else now - max(oldest.sent_at, self._last_outcome_at)

    def _ensure_producer(self) -> Producer | None:
        """The current producer, or None while one is being opened (on its own thread, so results keep
        moving into the spool and being counted while a broker is slow to answer or away).

        A producer is rebuilt when it keeps failing, or when it has gone silent: kafka-python has been seen
        to never answer again after its broker stopped answering for a few seconds (a paused process), and
        only a new producer sends again. Closing the silent one fails its messages back to the spool.
        """
        now = time.monotonic()
        with self._condition:
            if self._opening:
                return None
            failing = self._consecutive_failures >= _FAILURES_BEFORE_REBUILD
            stuck_s = self._stuck_for(now) if self._producer is not None else 0.0
            stuck = stuck_s > self._stuck_after_s
            if self._producer is not None and not failing and not stuck:
                return self._producer
            if now < self._retry_at:
                return None
            failed, self._producer = self._producer, None
            held = len(self._in_flight)
            self._consecutive_failures = 0
            self._draining = False
            self._generation += 1
            self._opening = True
        if stuck:
            log.error("Kafka producer has given no outcome for %.0f s with %d message(s) in flight; building a new "
                      "one", stuck_s, held)
        elif failed is not None:
            log.warning("Kafka producer keeps failing; building a new one")
        threading.Thread(target=self._open_producer, args=(failed,), name="kafka-open", daemon=True).start()
        return None

    def _open_producer(self, failed: Producer | None) -> None:
        close_kafka_producer(failed, 0)
        self._take_back_in_flight()
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

    def _take_back_in_flight(self) -> None:
        """What a replaced producer still holds after its close (it never answered) goes back to the spool, so
        the new producer starts with nothing older in flight; an outcome arriving later is ignored."""
        with self._condition:
            if self._finished:
                return
            stale = [token for token, record in self._in_flight.items() if record.generation < self._generation]
            records = [record for token in stale if (record := self._take_in_flight(token)) is not None]
            self._failed_deliveries.extend(record.message for record in records)
            if records:
                self._failing = True
                self._condition.notify_all()
        if records:
            self._metrics.kafka_outcomes["failed"].inc(len(records))
            log.warning("%d message(s) never came back from the replaced Kafka producer; sending them again",
                        len(records))

    def _count_unreachable(self, error: Exception) -> None:
        with self._condition:
            pending = len(self._spool) > 0
            self._failing = True
        if pending:
            self._metrics.kafka_outcomes["failed"].inc()
        log.warning("Kafka at %s is unreachable (%s); spooling", self._config.bootstrap_servers, error)

    def _close_producer(self, timeout: float) -> None:
        """Close within `timeout`; pending batches are aborted, so their messages go back to the spool."""
        with self._condition:
            producer, self._producer = self._producer, None
        close_kafka_producer(producer, timeout)
