"""The dashboard's Kafka consumer: one thread reading the frames, events and snapshots topics into the state.

No consumer group: every dashboard sees every stream, and none of them holds a group's partitions away from
another. Partitions are assigned by hand, so a topic that appears later (vap creates the snapshots topic when
it first sends a picture) is picked up, and each new partition starts a little before its end, so tiles show
the last known state of every camera at once instead of waiting for its next message.

The broker may be away at start or go away later: the page says so (`DashboardState.broker`), and the feed
keeps asking, once every `CHECK_EVERY_S`, and goes on by itself when the broker answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import KafkaConfig
from pipeline.dashboard.state import DashboardState
from pipeline.publishing.kafka_client import kafka_client_settings

log = logging.getLogger(__name__)

CHECK_EVERY_S = 2.0
_POLL_MS = 100
_MAX_RECORDS = 5000
_REOPEN_S = 2.0


@dataclass(frozen=True)
class FeedTopics:
    frames: str = "vap.frames"
    events: str | None = "vap.events"
    snapshots: str | None = "vap.snapshots"
    history: int = 30
    """Records read back from the end of each partition of a newly seen topic."""

    def names(self) -> list[str]:
        return [name for name in (self.frames, self.events, self.snapshots) if name]


def make_consumer(kafka: KafkaConfig) -> Any:
    from kafka import KafkaConsumer

    # A short reconnect backoff: after an outage the page should recover within seconds, not kafka-python's
    # default of up to 30 s.
    return KafkaConsumer(**kafka_client_settings(kafka), group_id=None, enable_auto_commit=False,
                         auto_offset_reset="latest", max_partition_fetch_bytes=8 * 2**20,
                         reconnect_backoff_max_ms=2000, bootstrap_timeout_ms=2000)


class KafkaFeed:
    """Reads the topics into `state` on a thread named `dashboard-feed` until `stop`."""

    def __init__(self, kafka: KafkaConfig, topics: FeedTopics, state: DashboardState,
                 consumer_factory: Callable[[KafkaConfig], Any] = make_consumer) -> None:
        self._kafka = kafka
        self._topics = topics
        self._state = state
        self._consumer_factory = consumer_factory
        self._stop = threading.Event()
        self._assigned: set[Any] = set()
        self._thread = threading.Thread(target=self._run, name="dashboard-feed", daemon=True)
        self.last_turn = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        if self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        consumer: Any = None
        next_check = 0.0
        try:
            while not self._stop.is_set():
                self.last_turn = time.monotonic()
                if consumer is None:
                    consumer = self._open()
                    if consumer is None:
                        self._stop.wait(_REOPEN_S)
                        continue
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + CHECK_EVERY_S
                    self._check(consumer)
                try:
                    batches = consumer.poll(timeout_ms=_POLL_MS, max_records=_MAX_RECORDS) if self._assigned else {}
                except Exception as error:  # kafka-python reconnects by itself; the next check tells the page
                    log.debug("poll failed: %r", error)
                    batches = {}
                if not self._assigned:
                    self._stop.wait(_POLL_MS / 1000)
                self._take(batches)
                self._state.tick(time.time())
        finally:
            if consumer is not None:
                consumer.close()

    def _open(self) -> Any:
        try:
            return self._consumer_factory(self._kafka)
        except Exception as error:
            self._unreachable(error)
            return None

    def _check(self, consumer: Any) -> None:
        """Whether the broker answers, and which partitions of our topics exist now."""
        from kafka import TopicPartition

        try:
            existing = consumer.topics()
            wanted = {TopicPartition(topic, partition) for topic in self._topics.names() if topic in existing
                      for partition in consumer.partitions_for_topic(topic) or ()}
            new = wanted - self._assigned
            if new or wanted != self._assigned:
                kept = {partition: consumer.position(partition) for partition in self._assigned & wanted}
                consumer.assign(sorted(wanted))
                for partition, position in kept.items():
                    consumer.seek(partition, position)
                self._rewind(consumer, sorted(new))
                self._assigned = wanted
        except Exception as error:
            self._unreachable(error)
            return
        # Only a missing results topic is worth a banner: no zones means no events topic, and vap without
        # kafka.snapshots.topic sends no pictures (the tiles then draw the detections alone).
        missing = self._topics.frames not in existing
        detail = f"no results topic '{self._topics.frames}' yet: is vap running?" if missing else ""
        self._state.set_broker("connected", detail, time.time())

    def _rewind(self, consumer: Any, partitions: list[Any]) -> None:
        if not partitions:
            return
        ends = consumer.end_offsets(partitions)
        starts = consumer.beginning_offsets(partitions)
        for partition in partitions:
            consumer.seek(partition, max(starts[partition], ends[partition] - self._topics.history))

    def _unreachable(self, error: BaseException) -> None:
        if self._state.broker != "unreachable":
            log.warning("Kafka at %s is not reachable (%s); the dashboard keeps trying",
                        self._kafka.bootstrap_servers, error)
        self._state.set_broker("unreachable", f"cannot reach Kafka at {self._kafka.bootstrap_servers}", time.time())

    def _take(self, batches: dict[Any, list[Any]]) -> None:
        now = time.time()
        state, topics = self._state, self._topics
        for partition, records in batches.items():
            topic = partition.topic
            for record in records:
                if topic == topics.frames:
                    state.frame(record.value, record.headers, now)
                elif topic == topics.snapshots:
                    state.picture(record.key, record.value, record.headers, now)
                elif topic == topics.events:
                    state.event(record.value, now)
