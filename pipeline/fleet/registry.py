"""The stream registry: a compacted Kafka topic whose record for each stream id is that stream's config.

Every replica reads the whole registry (not only its own partitions) so that any of them can answer for
the fleet, weigh partitions by their streams when it leads an assignment, and refuse a duplicate id.
The value is the stream's config as JSON (what a `streams:` item holds); headers say who wrote it:
`origin` (`file` or `api`), `worker`, and for file streams `source`, the config file's path.

`RegistryView` is the state and its rules, without I/O; `RegistryClient` reads and writes the topic.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import ValidationError

from pipeline.config import STREAM_ID_PATTERN, FleetConfig, KafkaConfig, StreamConfig
from pipeline.errors import RegistryUnavailable
from pipeline.ops.health import Heartbeats
from pipeline.publishing.kafka_client import kafka_client_settings
from pipeline.threads import StageThread

log = logging.getLogger(__name__)

Origin = Literal["file", "api"]
_ID = re.compile(STREAM_ID_PATTERN)


@dataclass(frozen=True)
class RegistryEntry:
    stream: StreamConfig
    partition: int
    origin: Origin
    writer: str
    source: str


@dataclass(frozen=True)
class RegistryChange:
    """One stream's record changed: `entry` is its new state, None when it left the registry."""

    stream_id: str
    entry: RegistryEntry | None


def encode_stream(stream: StreamConfig) -> bytes:
    """Only what differs from the defaults: a record stays valid when a later version changes a default."""
    return orjson.dumps(stream.model_dump(mode="json", exclude_defaults=True))


def registry_headers(origin: Origin, worker: str, source: str = "") -> list[tuple[str, bytes]]:
    return [("origin", origin.encode()), ("worker", worker.encode()), ("source", source.encode())]


class InvalidRecord(ValueError):
    """A registry record that is not a stream config; skipped, never fatal."""


class RegistryView:
    """Every stream of the registry as last read. Not thread-safe: its owner serialises access."""

    def __init__(self) -> None:
        self.entries: dict[str, RegistryEntry] = {}

    def apply(self, partition: int, key: bytes | None, value: bytes | None,
              headers: list[tuple[str, bytes]]) -> RegistryChange | None:
        """The change one record makes, None when it changes nothing. Raises `InvalidRecord` for a record
        that cannot be a stream: the view then keeps what it had for that key."""
        stream_id = _stream_id(key)
        if value is None:
            if self.entries.pop(stream_id, None) is None:
                return None  # a tombstone for an id never seen (or already removed)
            return RegistryChange(stream_id, None)
        try:
            stream = StreamConfig.model_validate(orjson.loads(value))
        except (orjson.JSONDecodeError, ValidationError, TypeError) as error:
            raise InvalidRecord(f"not a valid stream config: {_first_problem(error)}") from None
        if stream.id != stream_id:
            raise InvalidRecord(f"its config has id '{stream.id}', not its key")
        meta = {name: raw.decode("utf-8", "replace") for name, raw in headers}
        origin: Origin = "api" if meta.get("origin") == "api" else "file"
        entry = RegistryEntry(stream, partition, origin, meta.get("worker", ""), meta.get("source", ""))
        if self.entries.get(stream_id) == entry:
            return None
        self.entries[stream_id] = entry
        return RegistryChange(stream_id, entry)

    def streams_per_partition(self) -> dict[int, int]:
        weights: dict[int, int] = {}
        for entry in self.entries.values():
            weights[entry.partition] = weights.get(entry.partition, 0) + 1
        return weights


def _stream_id(key: bytes | None) -> str:
    if key is None:
        raise InvalidRecord("it has no key")
    try:
        stream_id = key.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRecord("its key is not UTF-8") from None
    if not _ID.match(stream_id):
        raise InvalidRecord("its key is not a stream id ([A-Za-z0-9._-])")
    return stream_id


def _first_problem(error: Exception) -> str:
    if isinstance(error, ValidationError):
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        return f"{where}: {problem['msg']}" if where else str(problem["msg"])
    return "not JSON" if isinstance(error, orjson.JSONDecodeError) else str(error)


class RegistryClient:
    """Reads the whole registry on a named thread into a `RegistryView`, and writes records.

    `on_change` runs on the reader thread, once per batch of changes, after the view holds them.
    """

    def __init__(self, kafka: KafkaConfig, fleet: FleetConfig, heartbeats: Heartbeats,
                 on_change: Callable[[list[RegistryChange]], None],
                 on_invalid: Callable[[str, str], None]) -> None:
        self._kafka = kafka
        self._fleet = fleet
        self._on_change = on_change
        self._on_invalid = on_invalid
        self._lock = threading.Lock()
        self._read_up_to = threading.Condition(self._lock)
        self._next_offsets: dict[int, int] = {}
        self._view = RegistryView()
        self._caught_up = threading.Event()
        self._stop = threading.Event()
        self._thread = StageThread("fleet-registry", self._read, heartbeats)
        self._producer: Any = None
        self._reading = False

    @property
    def topic(self) -> str:
        return self._fleet.streams_topic

    def entries(self) -> dict[str, RegistryEntry]:
        with self._lock:
            return dict(self._view.entries)

    def streams_per_partition(self) -> dict[int, int]:
        with self._lock:
            return self._view.streams_per_partition()

    def start(self) -> None:
        """Raises when Kafka cannot be reached; safe to call again until it succeeds."""
        from kafka import KafkaProducer

        self.ensure_topic()
        if self._producer is None:
            self._producer = KafkaProducer(**kafka_client_settings(self._kafka), acks="all", linger_ms=0,
                                           max_block_ms=5000)
        if not self._reading:
            self._reading = True
            self._thread.start()

    def wait_caught_up(self, timeout_s: float) -> bool:
        """Whether every record that was in the registry at start has been read."""
        return self._caught_up.wait(timeout_s)

    def ensure_topic(self) -> None:
        self.create_topic(self._kafka, self._fleet)

    @staticmethod
    def create_topic(kafka: KafkaConfig, fleet: FleetConfig) -> None:
        """The registry, compacted, when it is missing (its partitions are the fleet's unit of work)."""
        from kafka.admin import KafkaAdminClient, NewTopic
        from kafka.errors import TopicAlreadyExistsError

        admin = KafkaAdminClient(**kafka_client_settings(kafka), bootstrap_timeout_ms=5000)
        try:
            if fleet.streams_topic in admin.list_topics():
                return
            try:
                admin.create_topics([NewTopic(fleet.streams_topic, fleet.partitions, kafka.replication,
                                              topic_configs={"cleanup.policy": "compact"})])
                log.info("created the stream registry '%s' (%d partitions, compacted)", fleet.streams_topic,
                         fleet.partitions)
            except TopicAlreadyExistsError:
                pass
        finally:
            admin.close()

    def write(self, stream: StreamConfig, origin: Origin, source: str = "", timeout_s: float = 5.0) -> None:
        self._send(stream.id, encode_stream(stream), registry_headers(origin, self._fleet.worker_id, source),
                   timeout_s)

    def remove(self, stream_id: str, timeout_s: float = 5.0) -> None:
        self._send(stream_id, None, registry_headers("api", self._fleet.worker_id), timeout_s)

    def _send(self, stream_id: str, value: bytes | None, headers: list[tuple[str, bytes]], timeout_s: float) -> None:
        from kafka.errors import KafkaError

        deadline = time.monotonic() + timeout_s
        try:
            written = self._producer.send(self.topic, key=stream_id.encode(), value=value,
                                          headers=headers).get(timeout_s)
        except KafkaError as error:
            raise RegistryUnavailable(f"cannot write the stream registry '{self.topic}': {error}") from error
        with self._read_up_to:  # read your writes: what the API just wrote, this replica's view holds
            self._read_up_to.wait_for(lambda: self._next_offsets.get(written.partition, 0) > written.offset,
                                      max(0.0, deadline - time.monotonic()))

    def leave(self) -> None:
        self._stop.set()

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        self._thread.join(timeout_s)
        if self._producer is not None:
            self._producer.close(timeout=max(0.0, deadline - time.monotonic()))

    def _read(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(**kafka_client_settings(self._kafka), group_id=None, enable_auto_commit=False,
                                 auto_offset_reset="earliest")
        try:
            partitions = [TopicPartition(self.topic, partition)
                          for partition in sorted(_partitions_of(consumer, self.topic, self._stop))]
            consumer.assign(partitions)
            consumer.seek_to_beginning()
            end = consumer.end_offsets(partitions)
            while not self._stop.is_set():
                self._thread.beat()
                batches = consumer.poll(timeout_ms=200)
                changes: list[RegistryChange] = []
                with self._lock:
                    for records in batches.values():
                        for record in records:
                            change = self._apply(record)
                            if change is not None:
                                changes.append(change)
                if changes:
                    self._on_change(changes)
                with self._read_up_to:
                    for tp, records in batches.items():
                        self._next_offsets[tp.partition] = records[-1].offset + 1
                    self._read_up_to.notify_all()
                if not self._caught_up.is_set() and all(consumer.position(tp) >= end[tp] for tp in partitions):
                    self._caught_up.set()
        finally:
            consumer.close()

    def _apply(self, record: Any) -> RegistryChange | None:
        try:
            return self._view.apply(record.partition, record.key, record.value, list(record.headers or []))
        except InvalidRecord as error:
            key = record.key.decode("utf-8", "replace") if record.key is not None else "(none)"
            log.warning("stream registry: skipped the record for '%s' at partition %d offset %d: %s", key,
                        record.partition, record.offset, error)
            self._on_invalid(key, str(error))
            return None


def _partitions_of(consumer: Any, topic: str, stop: threading.Event) -> set[int]:
    """The registry's partitions; its metadata can take a moment to appear after the topic is created."""
    while True:
        partitions = consumer.partitions_for_topic(topic)
        if partitions or stop.wait(0.2):
            return set(partitions or ())
