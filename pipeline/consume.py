"""`vap consume`: tail result messages for dashboard developers and operators."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, TextIO

import orjson

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConsumeOptions:
    bootstrap: str
    topic: str
    streams: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    from_beginning: bool = False
    output_format: str = "table"
    group: str | None = None
    max_messages: int | None = None
    idle_timeout_s: float | None = None


_TABLE_HEADER = f"{'captured_at':<24} {'stream':<16} {'frame':>7} {'dets':>4} {'total_ms':>8}  labels"


def _items(message: dict[str, Any]) -> list[dict[str, Any]]:
    detections = message.get("detections")
    items: list[dict[str, Any]] = detections if detections is not None else message.get("classes", [])
    return items


def _labels_of(message: dict[str, Any]) -> set[str]:
    if message.get("schema") == "vap.event.v1":
        return {str(message["label"])}
    return {str(item["label"]) for item in _items(message)}


def format_table_row(message: dict[str, Any]) -> str:
    if message.get("schema") == "vap.event.v1":
        detail = message.get("direction") or (f"{message['dwell_s']} s" if message.get("dwell_s") else "")
        return (
            f"{message.get('occurred_at', ''):<24} {message.get('stream_id', ''):<16} {message.get('frame_id', ''):>7} "
            f"{message['event']:>5} {message['zone_kind']} {message['zone_id']} track {message['track_id']} "
            f"{message['label']} {detail}".rstrip()
        )
    items = _items(message)
    labels = Counter(str(item["label"]) for item in items)
    summary = ", ".join(f"{label} x{count}" for label, count in labels.most_common())
    total_ms = message.get("latency_ms", {}).get("total", 0.0)
    return (
        f"{message.get('captured_at', ''):<24} {message.get('stream_id', ''):<16} "
        f"{message.get('frame_id', ''):>7} {len(items):>4} {total_ms:>8.1f}  {summary}"
    )


def consume(options: ConsumeOptions, out: TextIO) -> int:
    """Print messages until interrupted, `max_messages`, or `idle_timeout_s` without one."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        options.topic,
        bootstrap_servers=options.bootstrap.split(","),
        group_id=options.group,
        auto_offset_reset="earliest" if options.from_beginning else "latest",
        enable_auto_commit=options.group is not None,
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
        max_poll_interval_ms=60_000,
    )
    wanted = set(options.streams)
    labels = set(options.labels)
    printed = 0
    last_message = time.monotonic()
    if options.output_format == "table":
        out.write(_TABLE_HEADER + "\n")
    try:
        while options.max_messages is None or printed < options.max_messages:
            batches = consumer.poll(timeout_ms=200)
            records = [record for batch in batches.values() for record in batch]
            if not records:
                if options.idle_timeout_s is not None and time.monotonic() - last_message > options.idle_timeout_s:
                    break
                continue
            last_message = time.monotonic()
            for record in records:
                key = record.key.decode("utf-8", "replace") if record.key else ""
                if wanted and key not in wanted:
                    continue
                message = orjson.loads(record.value)
                if labels and not labels & _labels_of(message):
                    continue
                if options.output_format == "json":
                    out.write(record.value.decode("utf-8", "replace") + "\n")
                else:
                    out.write(format_table_row(message) + "\n")
                printed += 1
                if options.max_messages is not None and printed >= options.max_messages:
                    break
            out.flush()
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0
