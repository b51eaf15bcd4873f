"""`vap streams list|add|remove`: the fleet's stream registry from any machine that reaches Kafka.

Writes go where a replica's control API writes them (a record per stream, origin `api`), so the replica that
owns a stream's partition starts or stops it within moments. No replica needs to be reachable over HTTP.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml
from pydantic import ValidationError

from pipeline.config import FleetConfig, KafkaConfig, StreamConfig, apply_override
from pipeline.fleet.registry import (
    InvalidRecord,
    RegistryClient,
    RegistryEntry,
    RegistryView,
    encode_stream,
    registry_headers,
)
from pipeline.publishing.kafka_client import kafka_client_settings

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
_READ_TIMEOUT_S = 10.0


class RegistryError(RuntimeError):
    """The registry cannot be reached or read; the message says what to check."""


@dataclass(frozen=True)
class Registry:
    kafka: KafkaConfig
    fleet: FleetConfig

    @property
    def topic(self) -> str:
        return self.fleet.streams_topic

    @property
    def writer(self) -> str:
        return f"cli@{socket.gethostname()}"


def registry_from(kafka: KafkaConfig | None, fleet: FleetConfig | None, bootstrap: str | None,
                  topic: str | None) -> Registry:
    """A config file's Kafka settings and registry, with `--bootstrap` and `--topic` over them."""
    kafka = kafka or KafkaConfig()
    fleet = fleet or FleetConfig(worker_id="cli")
    if bootstrap:
        kafka = kafka.model_copy(update={"bootstrap_servers": bootstrap})
    if topic:
        fleet = fleet.model_copy(update={"streams_topic": topic})
    return Registry(kafka, fleet)


def read_registry(registry: Registry, timeout_s: float = _READ_TIMEOUT_S) -> tuple[dict[str, RegistryEntry], int]:
    """Every stream in the registry, and how many records were skipped as not a stream."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    try:
        consumer = KafkaConsumer(**kafka_client_settings(registry.kafka), group_id=None, enable_auto_commit=False,
                                 bootstrap_timeout_ms=int(timeout_s * 1000))
    except KafkaError as error:
        raise RegistryError(f"cannot reach Kafka at {registry.kafka.bootstrap_servers}: {error}") from None
    view, skipped = RegistryView(), 0
    try:
        partitions = consumer.partitions_for_topic(registry.topic)
        if not partitions:
            return {}, 0
        assigned = [TopicPartition(registry.topic, partition) for partition in sorted(partitions)]
        consumer.assign(assigned)
        consumer.seek_to_beginning()
        end = consumer.end_offsets(assigned)
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in assigned):
            if time.monotonic() > deadline:
                raise RegistryError(f"the registry '{registry.topic}' was not read to its end in {timeout_s:.0f} s")
            for records in consumer.poll(timeout_ms=200).values():
                for record in records:
                    try:
                        view.apply(record.partition, record.key, record.value, list(record.headers or []))
                    except InvalidRecord:
                        skipped += 1
    finally:
        consumer.close()
    return view.entries, skipped


def write_record(registry: Registry, stream_id: str, value: bytes | None, timeout_s: float = 10.0) -> None:
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    try:
        RegistryClient.create_topic(registry.kafka, registry.fleet)
        producer = KafkaProducer(**kafka_client_settings(registry.kafka), acks="all",
                                 max_block_ms=int(timeout_s * 1000))
        try:
            producer.send(registry.topic, key=stream_id.encode(), value=value,
                          headers=registry_headers("api", registry.writer)).get(timeout_s)
        finally:
            producer.close(timeout=2)
    except KafkaError as error:
        raise RegistryError(f"cannot write the registry '{registry.topic}' at "
                            f"{registry.kafka.bootstrap_servers}: {error}") from None


def list_streams(registry: Registry, output_format: str, out: TextIO) -> int:
    entries, skipped = read_registry(registry)
    if output_format == "json":
        rows = [{"id": stream_id, "partition": entry.partition, "origin": entry.origin, "writer": entry.writer,
                 "source": entry.source, "config": json.loads(encode_stream(entry.stream))}
                for stream_id, entry in sorted(entries.items())]
        out.write(json.dumps(rows, indent=2) + "\n")
    else:
        out.write(f"{'id':<24} {'partition':>9} {'origin':<6} {'written by':<20} url\n")
        for stream_id, entry in sorted(entries.items()):
            out.write(f"{stream_id:<24} {entry.partition:>9} {entry.origin:<6} {entry.writer:<20} "
                      f"{entry.stream.redacted_url}\n")
    if skipped:
        print(f"vap streams: {skipped} record(s) in '{registry.topic}' are not stream configs and were skipped",
              file=sys.stderr)
    return EXIT_OK


def stream_from(stream_id: str | None, url: str | None, settings: list[str], file: Path | None) -> StreamConfig:
    """The stream to add: a YAML file (one `streams:` item), or `--id` and `--url`, with `--set` over either.

    Raises ValueError naming the key path of what is wrong."""
    tree: dict[str, Any] = {}
    if file is not None:
        loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        if not isinstance(loaded, dict):
            raise ValueError(f"{file}: must hold one stream (a mapping with id and url)")
        tree.update(loaded)
    if stream_id is not None:
        tree["id"] = stream_id
    if url is not None:
        tree["url"] = url
    for assignment in settings:
        apply_override(tree, assignment)
    try:
        return StreamConfig.model_validate(tree)
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "stream"
        raise ValueError(f"{where}: {problem['msg']}") from None


def add_stream(registry: Registry, stream: StreamConfig, replace: bool) -> int:
    entries, _ = read_registry(registry)
    if stream.id in entries and not replace:
        print(f"vap streams: '{stream.id}' is already in the registry; use --replace to change it", file=sys.stderr)
        return EXIT_FAILURE
    write_record(registry, stream.id, encode_stream(stream))
    print(f"{stream.id}: {'replaced' if stream.id in entries else 'added'} ({stream.redacted_url}); its replica "
          "starts it within moments")
    return EXIT_OK


def remove_stream(registry: Registry, stream_id: str) -> int:
    entries, _ = read_registry(registry)
    if stream_id not in entries:
        print(f"vap streams: no stream '{stream_id}' in the registry '{registry.topic}'", file=sys.stderr)
        return EXIT_FAILURE
    write_record(registry, stream_id, None)
    note = " (it came from a config file: a replica that restarts with that file adds it again)" \
        if entries[stream_id].origin == "file" else ""
    print(f"{stream_id}: removed{note}")
    return EXIT_OK
