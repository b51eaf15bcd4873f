"""The Kafka producer's keeper: opens it, replaces it, backs off while the broker is away, closes it.

Opening a producer, closing a stuck one and looking a topic up all block on the network, for seconds
when a broker is away. Each runs on a short-lived thread of its own, so the publisher's loop never
waits on a broker: results keep moving into the spool, and being counted, meanwhile. The threads never
touch the loop's state; they post what happened (`SupervisorEvent`s) for the loop to collect, in order,
at its next turn. A new producer becomes current only then, after the messages its predecessor never
answered for have gone back to the spool, so nothing newer overtakes them.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pipeline.config import KafkaConfig
from pipeline.publishing.kafka_client import Producer, close_kafka_producer

log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0


@dataclass(frozen=True)
class SupervisorEvent:
    """`replaced`: the old producer is closed (what it still held will never come back); `opened`: a new
    producer is ready; `unreachable`: opening failed; `topic`: a topic lookup finished (`there` is None
    when the cluster could not be asked)."""

    kind: Literal["replaced", "opened", "unreachable", "topic"]
    producer: Producer | None = None
    error: Exception | None = None
    there: bool | None = None


class ProducerSupervisor:
    """Owns the current producer. Every method is called from the publisher's loop thread only."""

    def __init__(
        self,
        config: KafkaConfig,
        factory: Callable[[KafkaConfig], Producer],
        topic_setup: Callable[[KafkaConfig, str], bool],
        wake: Callable[[], None],
    ) -> None:
        self._config = config
        self._factory = factory
        self._topic_setup = topic_setup
        self._wake = wake
        self._events: queue.SimpleQueue[SupervisorEvent] = queue.SimpleQueue()
        self._producer: Producer | None = None
        self._opening = False
        self._retry_at = 0.0
        self._backoff_s = FIRST_BACKOFF_S
        self._closed = threading.Event()
        self._closing = threading.Lock()

    @property
    def producer(self) -> Producer | None:
        """The producer to send to, or None while one is being opened or the broker is backed off from."""
        return self._producer

    def may_open(self, now: float) -> bool:
        return not self._opening and now >= self._retry_at and not self._closed.is_set()

    def open(self, reason: str = "") -> None:
        """Start opening a producer, closing the current one first (a failing or stuck one)."""
        replaced, self._producer = self._producer, None
        self._opening = True
        if reason:
            log.warning("%s; building a new Kafka producer", reason)
        threading.Thread(target=self._replace, args=(replaced,), name="kafka-open", daemon=True).start()

    def collect(self, now: float) -> list[SupervisorEvent]:
        """What the threads posted since the last call, in order; adopts a producer that opened."""
        events: list[SupervisorEvent] = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return events
            if event.kind == "opened":
                self._opening = False
                self._producer = event.producer
                self._backoff_s, self._retry_at = FIRST_BACKOFF_S, 0.0
            elif event.kind == "unreachable":
                self._opening = False
                self._retry_at = now + self._backoff_s
                self._backoff_s = min(MAX_BACKOFF_S, self._backoff_s * 2)
            events.append(event)

    def check_topic(self, topic: str) -> None:
        """Look `topic` up (and create it when missing and allowed) on a thread; a `topic` event follows."""
        threading.Thread(target=self._check_topic, args=(topic,), name="kafka-topic", daemon=True).start()

    def close(self, timeout: float) -> None:
        """Close the current producer within `timeout`: its pending batches are aborted and fail back. A
        producer that opens after this is closed at once."""
        with self._closing:
            self._closed.set()
        producer, self._producer = self._producer, None
        close_kafka_producer(producer, timeout)
        for event in self.collect(0.0):  # opened before the close, not yet collected
            close_kafka_producer(event.producer, 0)
        self._producer = None

    def _replace(self, replaced: Producer | None) -> None:
        if replaced is not None:
            close_kafka_producer(replaced, 0)
            self._post(SupervisorEvent("replaced"))
        try:
            producer = self._factory(self._config)
        except Exception as error:
            log.warning("Kafka at %s is unreachable (%s); spooling", self._config.bootstrap_servers, error)
            self._post(SupervisorEvent("unreachable", error=error))
            return
        with self._closing:
            if not self._closed.is_set():
                self._post(SupervisorEvent("opened", producer=producer))
                return
        close_kafka_producer(producer, 0)

    def _check_topic(self, topic: str) -> None:
        try:
            there = self._topic_setup(self._config, topic)
        except Exception as error:
            self._post(SupervisorEvent("topic", error=error))
        else:
            self._post(SupervisorEvent("topic", there=there))

    def _post(self, event: SupervisorEvent) -> None:
        self._events.put(event)
        self._wake()
