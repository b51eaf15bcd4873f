"""`vap consume`: tail result messages for dashboard developers and operators.

In fleet mode the table gives each row the worker (replica) that published it, and a line on stderr says when a
stream moved to another worker or restarted, so the frame ids that start again are not read as drops.
"""

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

from pipeline.client import GapTracker, worker_from_headers

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
_FRAME_COLUMNS = f"{'frame':>7} {'dets':>4} {'total_ms':>8}  labels"
_EVENT_COLUMNS = f"{'frame':>7} {'event':>5} zone, track, label, detail"


def table_header(schema: str, worker: bool = False) -> str:
    """The header of `format_table_row`'s rows for messages of `schema`, with a worker column for fleet mode."""
    event = schema == "vap.event.v1"
    worker_column = f" {'worker':<16}" if worker else ""
    return (f"{'occurred_at' if event else 'captured_at':<24} {'stream':<16}{worker_column} "
            f"{_EVENT_COLUMNS if event else _FRAME_COLUMNS}")


def _items(message: dict[str, Any]) -> list[dict[str, Any]]:
    detections = message.get("detections")
    items: list[dict[str, Any]] = detections if detections is not None else message.get("classes", [])
    return items


def _labels_of(message: dict[str, Any]) -> set[str]:
    if message.get("schema") == "vap.event.v1":
        return {str(message["label"])}
    return {str(item["label"]) for item in _items(message)}


def format_table_row(message: dict[str, Any], worker: str | None = None) -> str:
    """One row under `table_header(message's schema, worker is not None)`; `worker` from the record's header."""
    worker_column = f" {worker:<16}" if worker is not None else ""
    if message.get("schema") == "vap.event.v1":
        detail = message.get("direction") or (f"{message['dwell_s']} s" if message.get("dwell_s") else "")
        return (
            f"{message.get('occurred_at', ''):<24} {message.get('stream_id', ''):<16}{worker_column} "
            f"{message.get('frame_id', ''):>7} {message['event']:>5} {message['zone_kind']} {message['zone_id']} "
            f"track {message['track_id']} {message['label']} {detail}".rstrip()
        )
    items = _items(message)
    labels = Counter(str(item["label"]) for item in items)
    summary = ", ".join(f"{label} x{count}" for label, count in labels.most_common())
    total_ms = message.get("latency_ms", {}).get("total", 0.0)
    return (
        f"{message.get('captured_at', ''):<24} {message.get('stream_id', ''):<16}{worker_column} "
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


def _decode(value: bytes | None) -> dict[str, Any]:
    """The message as a dict; ValueError for a record that is not a vap message."""
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
    return message


def _render(message: dict[str, Any], value: bytes | None, worker: str | None, options: ConsumeOptions,
            labels: set[str]) -> tuple[str | None, str] | None:
    """The table header the message's line goes under (None for JSON, which passes the value through as is) and
    the line, with a worker column unless `worker` is None; None when the label filter drops it; ValueError for
    a malformed message."""
    try:
        if labels and not labels & _labels_of(message):
            return None
        if options.output_format == "json":
            return None, bytes(value or b"").decode("utf-8", "replace")
        return table_header(message["schema"], worker is not None), format_table_row(message, worker)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ValueError("not a vap.frame.v1 or vap.event.v1 message") from None


def _worker_name(worker: str | None) -> str:
    return f"worker {worker}" if worker is not None else "a vap outside fleet mode"


class _StreamWatch:
    """Follows each stream's worker and frame ids and says when a stream moved to another worker or restarted,
    so the frame ids that start again are not taken for drops. Results and events are followed apart: an event
    carries the id of the frame it was seen on, which may be behind the newest result's."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self._out = out
        self._err = err
        self._trackers: dict[str, GapTracker] = {}

    def follow(self, message: dict[str, Any], worker: str | None) -> None:
        stream_id, frame_id = message.get("stream_id"), message.get("frame_id")
        if not isinstance(stream_id, str) or not isinstance(frame_id, int) or isinstance(frame_id, bool):
            return
        step = self._trackers.setdefault(message["schema"], GapTracker()).follow(stream_id, frame_id, worker)
        if step.moved:
            self._say(f"{stream_id} moved from {_worker_name(step.previous_worker)} to {_worker_name(worker)} "
                      "(frame ids restart)")
        elif step.restarted:
            where = f" on worker {worker}" if worker is not None else ""
            self._say(f"{stream_id} restarted{where} (frame id {frame_id} after {step.previous_frame_id})")

    def _say(self, line: str) -> None:
        self._out.flush()  # the rows before it first, where both go to one terminal
        self._err.write(f"vap consume: {line}\n")
        self._err.flush()


def consume(options: ConsumeOptions, out: TextIO) -> int:
    """Print messages until interrupted, `max_messages`, or `idle_timeout_s` without one.

    A message that is not a vap result (another producer on the topic) is skipped with a warning, so one
    stray record never ends a tail that dashboards rely on. Moves and restarts of a stream are told on stderr,
    whatever the format, so JSON on stdout stays one message per line.
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
            try:
                _tail(consumer, options, out, broker)
            finally:
                consumer.close()  # within the watch: what kafka-python logs while closing is no news to the user
    except KeyboardInterrupt:
        pass
    return 0


def _tail(consumer: Any, options: ConsumeOptions, out: TextIO, broker: _BrokerWatch) -> int:
    """Print until `max_messages` or `idle_timeout_s` without a message; returns how many were printed."""
    wanted = set(options.streams)
    labels = set(options.labels)
    streams = _StreamWatch(out, sys.stderr)
    printed = 0
    last_message = time.monotonic()
    header_shown: str | None = None  # again whenever the kind of row changes: frames and events differ
    fleet = False  # once a record names its worker, every row has a worker column ("-" where none is named)
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
            worker = worker_from_headers(record.headers)
            fleet = fleet or worker is not None
            try:
                message = _decode(record.value)
                rendered = _render(message, record.value, (worker or "-") if fleet else None, options, labels)
            except ValueError as error:
                log.warning("skipped the message at %s[%d] offset %d: %s", record.topic, record.partition,
                            record.offset, error)
                continue
            streams.follow(message, worker)
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
