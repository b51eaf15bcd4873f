"""Drops, moves and restarts told apart: the typed reader and `vap consume` on fleet messages (`worker` header)."""

from __future__ import annotations

import io
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import orjson
import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from pipeline.client import Continuity, GapTracker, ResultReader, parse_message, worker_from_headers
from pipeline.publishing.messages import HEADERS, build_message, encode
from pipeline.tools.broker import EmbeddedBroker
from pipeline.tools.consume import ConsumeOptions, consume, format_table_row, table_header
from tests.conftest import unused_topic
from tests.fakes import make_frame, make_result

Step = tuple[int, str | None]  # frame_id, worker


def frame_message(stream_id: str, frame_id: int, captured_s: float = 0.0) -> bytes:
    """`captured_s` later than now: every frame of a real camera has its own capture time, and the reader
    drops a second message with the same stream, frame id and capture time as a duplicate."""
    frame = make_frame(stream_id, frame_id)
    frame = replace(frame, captured_at=frame.captured_at + timedelta(seconds=captured_s))
    return encode(build_message(make_result(frame), "m", datetime.now(timezone.utc), 1.0))


def follow_all(steps: list[Step]) -> list[Continuity]:
    tracker = GapTracker()
    return [tracker.follow("cam", frame_id, worker) for frame_id, worker in steps]


@pytest.mark.parametrize(("steps", "gap", "moved", "restarted"), [
    pytest.param([(4, "a"), (5, "a")], 0, False, False, id="next-frame-on-one-worker"),
    pytest.param([(4, "a"), (9, "a")], 4, False, False, id="frame-ids-skipped-on-one-worker-are-a-drop"),
    pytest.param([(4, None), (9, None)], 4, False, False, id="frame-ids-skipped-without-worker-are-a-drop"),
    pytest.param([(40, "a"), (0, "b")], 0, True, False, id="another-worker-is-a-move"),
    pytest.param([(4, "a"), (9, "b")], 0, True, False, id="a-move-is-never-a-drop-even-with-higher-ids"),
    pytest.param([(40, None), (0, "a")], 0, True, False, id="from-no-worker-to-a-worker-is-a-move"),
    pytest.param([(40, "a"), (0, None)], 0, True, False, id="from-a-worker-to-none-is-a-move"),
    pytest.param([(40, "a"), (0, "a")], 0, False, True, id="ids-going-back-on-one-worker-are-a-restart"),
    pytest.param([(40, None), (3, None)], 0, False, True, id="ids-going-back-without-worker-are-a-restart"),
    pytest.param([(40, "a"), (40, "a")], 0, False, False, id="a-repeated-id-is-neither"),
])
def test_the_tracker_tells_a_drop_from_a_move_from_a_restart(
    steps: list[Step], gap: int, moved: bool, restarted: bool
) -> None:
    first, last = follow_all(steps)
    assert first == Continuity(), "the first message of a stream is never a drop, move or restart"
    assert (last.gap, last.moved, last.restarted) == (gap, moved, restarted)
    assert (last.previous_frame_id, last.previous_worker) == steps[0]


def test_after_a_move_gaps_are_counted_on_the_new_worker() -> None:
    steps = follow_all([(7, "a"), (0, "b"), (1, "b"), (4, "b"), (5, "b")])
    assert [(s.gap, s.moved) for s in steps] == [(0, False), (0, True), (0, False), (2, False), (0, False)]


def test_the_tracker_follows_each_stream_on_its_own_and_observe_still_returns_the_gap() -> None:
    tracker = GapTracker()
    assert tracker.observe("one", 5, "a") == 0 and tracker.observe("two", 0, "b") == 0
    assert tracker.follow("one", 8, "a").gap == 2, "another stream's worker must not read as a move"
    assert tracker.observe("two", 3) == 0, "stream two lost its worker header: a move, not a drop"


def test_parse_message_takes_the_worker_from_the_headers_and_never_from_the_body() -> None:
    value = frame_message("cam-01", 3)
    assert parse_message(value).worker is None
    assert parse_message(value, [*HEADERS, ("worker", b"vap-7")]).worker == "vap-7"
    body = orjson.loads(value) | {"worker": "forged", "gap": 9, "moved": True}
    message = parse_message(orjson.dumps(body), HEADERS)
    assert (message.worker, message.gap, message.moved, message.restarted) == (None, 0, False, False)


@pytest.mark.parametrize(("headers", "worker"), [
    pytest.param(None, None, id="no-headers"),
    pytest.param([("schema", b"vap.frame.v1")], None, id="no-worker-header"),
    pytest.param([("worker", b"")], None, id="empty-worker-header"),
    pytest.param([("worker", None)], None, id="worker-header-without-value"),
    pytest.param([("worker", b"a"), ("worker", b"b")], "b", id="repeated-header-last-wins"),
    pytest.param([("worker", "höst".encode())], "höst", id="utf-8"),
])
def test_worker_from_headers(headers: list[tuple[str, bytes | None]] | None, worker: str | None) -> None:
    assert worker_from_headers(headers) == worker


def test_a_table_row_puts_the_worker_under_its_column() -> None:
    message = orjson.loads(frame_message("cam-01", 12))
    header, row = table_header("vap.frame.v1", worker=True), format_table_row(message, "vap-b")
    assert row[header.index("worker"):].startswith("vap-b ")
    assert row[header.index("frame") - 2:].lstrip().startswith("12 ")
    assert "worker" not in table_header("vap.frame.v1") and "vap-b" not in format_table_row(message)


def produce_fleet_records(bootstrap: str, topic: str) -> None:
    """cam-01 runs on worker a (frames 0, 1, 4), moves to worker b (0, 1, 2); cam-02, outside fleet mode, goes
    0, 1 and restarts at 0."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        admin.close()
    records: list[tuple[str, int, str | None]] = [
        ("cam-01", 0, "a"), ("cam-02", 0, None), ("cam-01", 1, "a"), ("cam-01", 4, "a"), ("cam-02", 1, None),
        ("cam-01", 0, "b"), ("cam-01", 1, "b"), ("cam-02", 0, None), ("cam-01", 2, "b"),
    ]
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        for index, (stream_id, frame_id, worker) in enumerate(records):
            headers = [*HEADERS, *([("worker", worker.encode())] if worker is not None else [])]
            producer.send(topic, key=stream_id.encode(), value=frame_message(stream_id, frame_id, index),
                          headers=headers)
        producer.flush(timeout=10)
    finally:
        producer.close()


def test_result_reader_fills_worker_and_tells_a_move_and_a_restart_from_drops(broker: EmbeddedBroker) -> None:
    topic = unused_topic("reader-moves")
    produce_fleet_records(broker.bootstrap_servers, topic)
    with ResultReader(broker.bootstrap_servers, topic=topic, from_beginning=True, idle_timeout_s=3) as reader:
        messages = list(reader)
    seen = [(m.stream_id, m.frame_id, m.worker, m.gap, m.moved, m.restarted) for m in messages]
    assert seen == [
        ("cam-01", 0, "a", 0, False, False),
        ("cam-02", 0, None, 0, False, False),
        ("cam-01", 1, "a", 0, False, False),
        ("cam-01", 4, "a", 2, False, False),
        ("cam-02", 1, None, 0, False, False),
        ("cam-01", 0, "b", 0, True, False),
        ("cam-01", 1, "b", 0, False, False),
        ("cam-02", 0, None, 0, False, True),
        ("cam-01", 2, "b", 0, False, False),
    ]


def test_consume_shows_the_worker_and_says_when_a_stream_moved_or_restarted(
    broker: EmbeddedBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    topic = unused_topic("consume-moves")
    produce_fleet_records(broker.bootstrap_servers, topic)
    out = io.StringIO()
    options = ConsumeOptions(bootstrap=broker.bootstrap_servers, topic=topic, from_beginning=True,
                             idle_timeout_s=3)
    assert consume(options, out) == 0
    header, *rows = out.getvalue().splitlines()
    assert header == table_header("vap.frame.v1", worker=True), "one header: rows without a worker show '-'"
    workers = [row[header.index("worker"):].split()[0] for row in rows]
    assert workers == ["a", "-", "a", "a", "-", "b", "b", "-", "b"]
    notices = capsys.readouterr().err.strip().splitlines()
    assert notices == ["vap consume: cam-01 moved from worker a to worker b (frame ids restart)",
                       "vap consume: cam-02 restarted (frame id 0 after 1)"]

    as_json = io.StringIO()
    assert consume(ConsumeOptions(bootstrap=broker.bootstrap_servers, topic=topic, from_beginning=True,
                                  output_format="json", idle_timeout_s=3), as_json) == 0
    printed = [orjson.loads(line) for line in as_json.getvalue().splitlines()]
    assert [(m["stream_id"], m["frame_id"]) for m in printed] == [
        ("cam-01", 0), ("cam-02", 0), ("cam-01", 1), ("cam-01", 4), ("cam-02", 1), ("cam-01", 0), ("cam-01", 1),
        ("cam-02", 0), ("cam-01", 2)]
    assert not any("worker" in m for m in printed), "JSON passes the messages through as is"
    assert capsys.readouterr().err.strip().splitlines() == notices, "the notices go to stderr in JSON too"
