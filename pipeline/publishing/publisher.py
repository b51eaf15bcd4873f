"""The Kafka publisher: a thread that moves encoded messages from its inbox to Kafka, and reports every
message's fate.

Three parts, each small enough to hold in one's head:
- `DeliveryState` (`delivery.py`) decides: what goes out next, what a failure means, what is dropped;
- `ProducerSupervisor` (`supervisor.py`) opens and replaces producers without blocking the loop;
- this loop feeds them, sends, and turns each `Outcome` into metrics and a ledger entry.

Why a spool of our own in front of kafka-python's buffer: while the broker is away, `send` blocks, and a
stuck producer (one whose broker lost its producer ids after a restart) never recovers by itself. Keeping
encoded messages here lets the publisher rebuild the producer and resend, and decide exactly what is
dropped when a bound is reached.

With `kafka.spool.dir`, the loop writes what the state machine reports to the spool's log (`spool_log.py`)
before it sends: every message is on disk (synced within half a second) until it is settled, and the next
start sends again what a crash or a stop left unsettled.

Counting (`vap_kafka_messages_total`): `sent` is a message the broker acknowledged; `failed` is a delivery
attempt that did not succeed (the message is tried again unless Kafka will never take it); `dropped` is a
message lost for good. A frame's message that is sent makes the frame `published` in the ledger; one that
is dropped drops the frame, with the reason.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from pipeline.config import KafkaConfig
from pipeline.ledger import FrameLedger
from pipeline.ops.health import Heartbeats
from pipeline.ops.metrics import PipelineMetrics
from pipeline.ops.repeated_log import RepeatedErrorLog
from pipeline.publishing.accounting import DeliveryAccounting
from pipeline.publishing.delivery import DeliveryState, Outcome
from pipeline.publishing.kafka_client import (
    Producer,
    delivery_error_kind,
    delivery_timeout_ms,
    ensure_topic,
    make_kafka_producer,
)
from pipeline.publishing.messages import EVENT_HEADERS, HEADERS
from pipeline.publishing.spool import OutgoingMessage
from pipeline.publishing.spool_journal import SpoolJournal
from pipeline.publishing.spool_log import WriteFn
from pipeline.publishing.supervisor import ProducerSupervisor, SupervisorEvent
from pipeline.threads import StageThread

log = logging.getLogger(__name__)

# The inbox only bridges threads: the loop moves it into the spool every turn. Bounded in bytes, since
# messages differ a hundredfold in size (an empty frame against 300 masks).
INBOX_MAX_BYTES = 16 * 2**20
_CLOSE_RESERVE_S = 1.0
# The loop takes a turn at most this often, or every `kafka.linger_ms` if that is shorter (the time the Kafka client
# itself waits to fill a batch). The analytics threads hand frames over one at a time; with a turn and a pipe write
# to the Kafka client for each, publishing cost the pipeline's process about twice as much per message
# (`benchmarks/publisher_path.py`).
_GATHER_S = 0.002


class KafkaPublisher:
    """Delivers encoded messages on its own thread; `submit` never blocks the caller."""

    def __init__(
        self,
        config: KafkaConfig,
        ledger: FrameLedger,
        metrics: PipelineMetrics,
        heartbeats: Heartbeats,
        producer_factory: Callable[[KafkaConfig], Producer] = make_kafka_producer,
        events_topic: str = "vap.events",
        topic_setup: Callable[[KafkaConfig, str], bool] = ensure_topic,
        inbox_max_bytes: int | None = None,
        extra_headers: list[tuple[str, bytes]] | None = None,
        log_write: WriteFn = os.write,
    ) -> None:
        self._config = config
        self._events_topic = events_topic
        self._frame_headers = [*HEADERS, *(extra_headers or [])]
        self._event_headers = [*EVENT_HEADERS, *(extra_headers or [])]
        self._metrics = metrics
        self._spool_depth = metrics.queue_depth.labels(stage="kafka_spool")
        self._condition = threading.Condition()
        # kafka-python fails a message itself after its delivery timeout; a producer that has given no outcome
        # for much longer than that is stuck. Longer than the Kafka child's own watchdog (twice the delivery
        # timeout), which replaces a stuck child first.
        self._state = DeliveryState(config.spool.max_messages, config.spool.max_bytes,
                                    stuck_after_s=2.5 * delivery_timeout_ms(config) / 1000, now=time.monotonic(),
                                    inbox_max_bytes=INBOX_MAX_BYTES if inbox_max_bytes is None else inbox_max_bytes,
                                    journal=config.spool.dir is not None)
        self._accounting = DeliveryAccounting(ledger, metrics)
        self._journal = None if config.spool.dir is None else SpoolJournal(
            config.spool.dir, config.spool.max_bytes, self._state, self._condition, self._accounting, metrics,
            log_write)
        self._supervisor = ProducerSupervisor(config, producer_factory, topic_setup, self._wake)
        self._stop = threading.Event()
        self._closed = False
        self._gather_s = min(_GATHER_S, config.linger_ms / 1000)
        self._turn_started = 0.0
        self._acknowledged: deque[int] = deque()  # tokens of deliveries the loop has yet to settle
        self._flush_deadline = 0.0
        self._finish_deadline = 0.0
        self._loop_errors = RepeatedErrorLog(log)
        self._topic_errors = RepeatedErrorLog(log)
        self._thread = StageThread("publisher", self._run, heartbeats)

    # What others see

    @property
    def connected(self) -> bool:
        with self._condition:
            return self._state.connected(time.monotonic())

    def overflowing(self) -> bool:
        with self._condition:
            return self._state.overflowing(time.monotonic())

    def backlog(self) -> int:
        """Messages not yet settled: waiting in the inbox, spooled or in flight."""
        with self._condition:
            return self._state.backlog()

    @property
    def thread_name(self) -> str:
        return self._thread.name

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # Life cycle

    def start(self) -> None:
        if self._journal is not None:
            self._journal.recover()
        self._thread.start()

    def submit(self, messages: Iterable[OutgoingMessage]) -> None:
        """Queue messages for Kafka; when the inbox is full the oldest are dropped (and counted)."""
        with self._condition:
            if self._closed:
                lost = [Outcome("dropped", message, "shutdown", "the publisher has stopped") for message in messages]
            else:
                lost = self._state.offer(messages, time.monotonic())
            self._condition.notify_all()
        self._accounting.record(lost)

    def stop(self, flush_timeout_s: float) -> None:
        """Deliver what is pending, then close the producer and keep (spool dir) or count as dropped the rest;
        all within `flush_timeout_s`. The last part of it (at most a second) is kept for the close."""
        with self._condition:
            now = time.monotonic()
            self._finish_deadline = now + flush_timeout_s
            self._flush_deadline = self._finish_deadline - min(_CLOSE_RESERVE_S, flush_timeout_s / 3)
            self._stop.set()
            self._condition.notify_all()

    def join(self, timeout: float) -> bool:
        return self._thread.join(timeout)

    # The loop

    def _run(self) -> None:
        try:
            while not self._turn():
                pass
        finally:
            self._finish()

    def _turn(self) -> bool:
        """One pass of the loop; True once it is time to stop.

        A pass that fails is logged and the loop goes on: messages keep arriving, and a publisher thread that
        ended would leave every one of them unsent and uncounted.
        """
        try:
            pause = self._turn_started + self._gather_s - time.monotonic()
            if pause > 0:
                self._stop.wait(pause)
            self._turn_started = time.monotonic()
            self._thread.beat()
            self._accounting.record(self._take_inbox_and_events())
            if self._journal is not None:
                self._journal.write(time.monotonic())
            self._send_what_may_go()
            with self._condition:
                if self._stop.is_set() and (self._state.backlog() == 0 or time.monotonic() >= self._flush_deadline):
                    return True
                if not self._state.has_arrivals() and not self._acknowledged:
                    self._condition.wait(timeout=0.05 if self._state.backlog() else 0.2)
        except Exception:
            self._loop_errors.error("publisher loop failed; going on", exc_info=True)
            if self._stop.is_set() and time.monotonic() >= self._flush_deadline:
                return True
            with self._condition:
                self._condition.wait(timeout=0.1)
        return False

    def _take_inbox_and_events(self) -> list[Outcome]:
        with self._condition:
            now = time.monotonic()
            outcomes = self._settle_acknowledged(now)
            outcomes += self._supervisor_events(self._supervisor.collect(now), now)
            outcomes += self._state.admit(now)
            self._spool_depth.set(self._state.spooled())
            return outcomes

    def _supervisor_events(self, events: list[SupervisorEvent], now: float) -> list[Outcome]:
        """Called holding the lock."""
        outcomes: list[Outcome] = []
        for event in events:
            if event.kind == "replaced":
                outcomes += self._state.take_back_stale(now)
                if outcomes:
                    log.warning("%d message(s) never came back from the replaced Kafka producer; sending them "
                                "again", len(outcomes))
            elif event.kind == "unreachable" and self._state.producer_unavailable():
                self._metrics.kafka_outcomes["failed"].inc()
            elif event.kind == "topic":
                if event.there is None:
                    self._state.events_topic_check_failed(now)
                    self._topic_errors.error("cannot look up Kafka topic '%s' (%s); zone events wait",
                                             self._events_topic, event.error)
                else:
                    self._state.events_topic_checked(event.there, now)
        return outcomes

    def _send_what_may_go(self) -> None:
        producer = self._current_producer()
        if producer is None:
            return
        flushing = self._stop.is_set()
        with self._condition:
            check, dropped = self._state.events_topic_check_due(time.monotonic(), flushing)
        self._accounting.record(dropped)
        if check:
            self._supervisor.check_topic(self._events_topic)
        while True:
            with self._condition:
                send = self._state.next_send(time.monotonic(), flushing)
            if send is None:
                return
            message = send.message
            topic, headers = ((self._events_topic, self._event_headers) if message.event
                              else (self._config.topic, self._frame_headers))
            try:
                future = producer.send(topic, value=message.value, key=message.key, headers=headers)
            except Exception as error:
                kind = self._failed(send.token, error)
                if kind == "rejected" or message.event:
                    continue
                return
            future.add_callback(self._delivered, send.token)
            future.add_errback(self._failed, send.token)

    def _current_producer(self) -> Producer | None:
        """The producer to send to; starts opening one when there is none, or replacing one that keeps
        failing or has gone silent (kafka-python has been seen never to answer again after its broker stopped
        answering for a few seconds, and only a new producer sends again)."""
        supervisor = self._supervisor
        now = time.monotonic()
        with self._condition:
            producer = supervisor.producer
            reason = self._state.wants_new_producer(now, producer is not None)
            if producer is not None and reason is None:
                return producer
            if not supervisor.may_open(now):
                return None
            self._state.new_generation()
        if reason == "stuck":
            supervisor.open(f"Kafka producer has given no outcome for {self._state.silent_for(now):.0f} s")
        else:
            supervisor.open("Kafka producer keeps failing" if reason else "")
        return None

    def _delivered(self, token: int, _metadata: object) -> None:
        """Called on the Kafka client's thread; the loop settles deliveries in batches, at its next turn."""
        self._acknowledged.append(token)
        self._wake()

    def _settle_acknowledged(self, now: float) -> list[Outcome]:
        """Called holding the lock, before anything that must see the deliveries so far: a failure (a delivery
        reported before it resets the failure count, not after), a producer's replacement (a message delivered
        is not sent again) and the stop's last count."""
        outcomes: list[Outcome] = []
        while self._acknowledged:
            outcomes += self._state.delivered(self._acknowledged.popleft(), now)
        return outcomes

    def _failed(self, token: int, error: Exception) -> str:
        kind = delivery_error_kind(error)
        with self._condition:
            now = time.monotonic()
            outcomes = self._settle_acknowledged(now)
            outcomes += self._state.failed(token, kind, now, detail=repr(error))
            self._condition.notify_all()
        log.debug("delivery failed: %r", error)
        self._accounting.record(outcomes)
        return kind

    def _wake(self) -> None:
        with self._condition:
            self._condition.notify_all()

    # The end

    def _finish(self) -> None:
        """Close the producer, wait for what it held to come back, then keep or count what is undelivered.

        kafka-python fails its pending batches back on its own thread once closed; counting them before they
        are back would call dropped the messages a spool dir is there to keep.
        """
        try:
            deadline = self._finish_deadline if self._stop.is_set() else time.monotonic() + _CLOSE_RESERVE_S
            self._supervisor.close(timeout=max(0.0, (deadline - time.monotonic()) / 2))
            settled: list[Outcome] = []
            with self._condition:
                while True:
                    settled += self._settle_acknowledged(time.monotonic())
                    if not self._state.in_flight() or (left := deadline - time.monotonic()) <= 0:
                        break
                    self._condition.wait(timeout=min(left, 0.05))
            self._accounting.record(settled)
        except Exception:
            log.exception("closing the Kafka producer failed")
        with self._condition:
            self._closed = True
        self._accounting.record(self._take_inbox_and_events())
        if self._journal is not None:
            self._journal.write(time.monotonic())
        with self._condition:
            settled = self._settle_acknowledged(time.monotonic())
            undelivered = self._state.undelivered()
        self._accounting.record(settled)
        lost = undelivered if self._journal is None else self._journal.close(undelivered)
        if lost:
            log.warning("stopping with %d undelivered message(s); counted as dropped", len(lost))
            self._accounting.record([Outcome("dropped", message, "shutdown", "undelivered at stop")
                                     for message in lost])
