"""`vap consume`: tail result messages for dashboard developers and operators."""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
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


_SCHEMAS = ("vap.frame.v1", "vap.event.v1")
_QUIET_BEFORE_BACK_S = 5.0
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
        raise BadBootstrap(f"vap consume: --bootstrap {options.bootstrap} is not HOST:PORT[,HOST:PORT] ({error})") \
            from None
    finally:
        kafka_log.setLevel(level)
    return None


class BadBootstrap(ValueError):
    """A --bootstrap that is not a broker address at all: a usage mistake, exit 2."""


class _BrokerWatch(logging.Handler):
    """Stands in for kafka-python's log while tailing: a lost broker makes it log several errors a second,
    which would bury the messages; one line says the broker is gone and one that it is back."""

    def __init__(self, bootstrap: str, err: TextIO) -> None:
        super().__init__(logging.ERROR)
        self._bootstrap = bootstrap
        self._err = err
        self._lost = False
        self._last_error: str | None = None
        self._last_error_at = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        self._last_error, self._last_error_at = record.getMessage(), time.monotonic()

    def check(self, received: bool, connected: bool | None) -> None:
        """Lost: kafka-python logged an error and holds no broker connection. Back: a message arrived or a
        connection is up again; where the client cannot say (`connected` None), once it has logged no error
        for a while."""
        if not self._lost:
            if self._last_error is not None and not received and connected is not True:
                self._lost = True
                self._say(f"lost the broker at {self._bootstrap} ({self._last_error}); retrying until it is back "
                          "(Ctrl-C to stop)")
            self._last_error = None
            return
        quiet = connected is None and time.monotonic() - self._last_error_at > _QUIET_BEFORE_BACK_S
        if received or connected or quiet:
            self._lost = False
            self._last_error = None
            self._say(f"the broker at {self._bootstrap} answers again")

    def _say(self, line: str) -> None:
        self._err.write(f"vap consume: {line}\n")
        self._err.flush()


def _connected(consumer: Any) -> bool | None:
    """Whether the consumer holds a connection to a broker; None where this kafka-python cannot say."""
    try:
        client = consumer._client
        return any(client.connected(broker.node_id) for broker in client.cluster.brokers())
    except Exception:
        return None


@contextmanager
def _watching_broker(bootstrap: str) -> Iterator[_BrokerWatch]:
    kafka_log = logging.getLogger("kafka")
    watch = _BrokerWatch(bootstrap, sys.stderr)
    propagate, level = kafka_log.propagate, kafka_log.level
    kafka_log.addHandler(watch)
    kafka_log.propagate = False
    kafka_log.setLevel(logging.ERROR)
    try:
        yield watch
    finally:
        kafka_log.removeHandler(watch)
        kafka_log.propagate, kafka_log.level = propagate, level


def _render(value: bytes | None, options: ConsumeOptions, labels: set[str]) -> tuple[str | None, str] | None:
    """The table header the message's line goes under (None for JSON) and the line; None when the label filter
    drops it; ValueError for a foreign message."""
    try:
        message = orjson.loads(value) if value is not None else None
    except orjson.JSONDecodeError:
        raise ValueError("not JSON") from None
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    if "schema" not in message:
        raise ValueError("no schema field; not a vap message")
    if message["schema"] not in _SCHEMAS:
        raise ValueError(f"schema {message['schema']!r} is not one of {', '.join(_SCHEMAS)}")
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
    try:
        consumer = _open_consumer(options)
    except BadBootstrap as error:
        print(error, file=sys.stderr)
        return 2
    if consumer is None:
        return 1
    try:
        with _watching_broker(options.bootstrap) as broker:
            _tail(consumer, options, out, broker)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0


def _tail(consumer: Any, options: ConsumeOptions, out: TextIO, broker: _BrokerWatch) -> int:
    """Print until `max_messages` or `idle_timeout_s` without a message; returns how many were printed."""
    wanted = set(options.streams)
    labels = set(options.labels)
    printed = 0
    last_message = time.monotonic()
    header_shown: str | None = None  # again whenever the kind of row changes: frames and events differ
    while options.max_messages is None or printed < options.max_messages:
        batches = consumer.poll(timeout_ms=200)
        records = [record for batch in batches.values() for record in batch]
        broker.check(bool(records), _connected(consumer))
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
    return printed
