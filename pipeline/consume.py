"""`vap consume`: tail result messages for dashboard developers and operators."""

from __future__ import annotations

import logging
import sys
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
    connect_timeout_s: float = 10.0


_FRAME_HEADER = f"{'captured_at':<24} {'stream':<16} {'frame':>7} {'dets':>4} {'total_ms':>8}  labels"
_EVENT_HEADER = f"{'occurred_at':<24} {'stream':<16} {'frame':>7} {'event':>5} zone, track, label, detail"


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


def _open_consumer(options: ConsumeOptions) -> Any:
    """A subscribed consumer, or None after one line saying why there is none."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    kafka_log = logging.getLogger("kafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)  # every refused try logs a line; one summary says it better
    try:
        return KafkaConsumer(
            options.topic,
            bootstrap_servers=options.bootstrap.split(","),
            group_id=options.group,
            auto_offset_reset="earliest" if options.from_beginning else "latest",
            enable_auto_commit=options.group is not None,
            session_timeout_ms=6000,
            heartbeat_interval_ms=2000,
            max_poll_interval_ms=60_000,
            bootstrap_timeout_ms=int(options.connect_timeout_s * 1000),
        )
    except KafkaError:
        print(f"vap consume: no Kafka broker answered at {options.bootstrap} within {options.connect_timeout_s:g} s; "
              "check --bootstrap and that the broker is running", file=sys.stderr)
    except ValueError as error:
        print(f"vap consume: --bootstrap {options.bootstrap} is not HOST:PORT[,HOST:PORT] ({error})", file=sys.stderr)
    finally:
        kafka_log.setLevel(level)
    return None


def _render(value: bytes | None, options: ConsumeOptions, labels: set[str]) -> tuple[str | None, str] | None:
    """The table header the message's line goes under (None for JSON) and the line; None when the label filter
    drops it; ValueError for a foreign message."""
    try:
        message = orjson.loads(value) if value is not None else None
    except orjson.JSONDecodeError:
        raise ValueError("not JSON") from None
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    try:
        if labels and not labels & _labels_of(message):
            return None
        if options.output_format == "json":
            return None, bytes(value or b"").decode("utf-8", "replace")
        header = _EVENT_HEADER if message.get("schema") == "vap.event.v1" else _FRAME_HEADER
        return header, format_table_row(message)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ValueError("not a vap.frame.v1 or vap.event.v1 message") from None


def consume(options: ConsumeOptions, out: TextIO) -> int:
    """Print messages until interrupted, `max_messages`, or `idle_timeout_s` without one.

    A message that is not a vap result (another producer on the topic) is skipped with a warning, so one
    stray record never ends a tail that dashboards rely on.
    """
    consumer = _open_consumer(options)
    if consumer is None:
        return 1
    wanted = set(options.streams)
    labels = set(options.labels)
    printed = 0
    last_message = time.monotonic()
    header_shown: str | None = None  # again whenever the kind of row changes: frames and events differ
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
                try:
                    rendered = _render(record.value, options, labels)
                except ValueError as error:
                    log.warning("skipped the message at %s[%d] offset %d: %s", record.topic, record.partition,
                                record.offset, error)
                    continue
                if rendered is None:
                    continue
                header, line = rendered
                if header is not None and header != header_shown:
                    out.write(header + "\n")
                    header_shown = header
                out.write(line + "\n")
                printed += 1
                if options.max_messages is not None and printed >= options.max_messages:
                    break
            out.flush()
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0
