"""Properties that must hold for any input, checked with Hypothesis:
- config loading: any YAML gives a valid config or a `ConfigError` whose every problem names a key path
  (what `vap validate` prints, exit 2), never another exception (a traceback for the user);
- the typed reader: any bytes give a message or a counted skip, never an exception that would end a
  dashboard's loop;
- the spool's log: any torn or damaged segment gives exactly the records before the damage.
"""

from __future__ import annotations

from typing import Any

import orjson
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.client import MessageStream
from pipeline.config import PipelineConfig, load_config
from pipeline.errors import ConfigError
from pipeline.publishing.spool import OutgoingMessage
from pipeline.publishing.spool_log import encode_message, encode_settled, parse_segment

VALID = {
    "streams": [{"id": "cam-1", "url": "rtsp://192.0.2.1/live", "fps": 10}],
    "model": {"weights": "yolo11n-seg.pt", "imgsz": 320, "precision": "auto"},
    "batching": {"max_batch": 4, "max_wait_ms": 20},
    "kafka": {"bootstrap_servers": "localhost:9092", "topic": "vap.frames",
              "spool": {"max_messages": 100}, "snapshots": {"topic": "vap.snapshots"}},
    "http": {"host": "127.0.0.1", "port": 9108, "allowed_hosts": ["vap.example.com"]},
    "analytics": {"zones": [{"id": "door", "polygon": [[0, 0], [10, 0], [10, 10]]}]},
}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20))
trees = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children, max_size=4)), max_leaves=20)


def paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found += paths(value, (*prefix, index))
    return found


def replaced(tree: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy = orjson.loads(orjson.dumps(tree))
    node = copy
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return copy


def load(text: str) -> None:
    try:
        config = load_config(None, text=text, environ={})
    except ConfigError as error:
        assert error.problems, "a ConfigError must say what is wrong"
        for key, message in error.problems:
            assert isinstance(key, str) and isinstance(message, str) and message
    else:
        assert isinstance(config, PipelineConfig)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(paths(VALID)), trees)
def test_any_value_anywhere_in_a_valid_config_gives_a_config_or_key_path_errors(path: tuple[Any, ...],
                                                                                value: Any) -> None:
    load(yaml.safe_dump(replaced(VALID, path, value)))


@settings(max_examples=150, deadline=None)
@given(trees)
def test_any_yaml_tree_gives_a_config_or_key_path_errors(tree: Any) -> None:
    load(yaml.safe_dump(tree))


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_any_text_gives_a_config_or_key_path_errors(text: str) -> None:
    load(text)


MESSAGE = orjson.dumps({
    "schema": "vap.frame.v1", "stream_id": "cam", "frame_id": 3, "pts_ms": None,
    "captured_at": "2026-12-07T10:00:00.000Z", "published_at": "2026-12-07T10:00:00.100Z",
    "image": {"width": 64, "height": 48}, "model": {"name": "m", "task": "detect"},
    "latency_ms": {"queue": 1.0, "inference": 2.0, "total": 3.0}, "detections": [],
})
headers = st.lists(st.tuples(st.text(max_size=8), st.one_of(st.none(), st.binary(max_size=8))), max_size=3)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.builds(lambda tree: orjson.dumps(tree, default=str), trees),
                 st.builds(lambda cut: MESSAGE[:cut], st.integers(0, len(MESSAGE)))), headers)
def test_any_bytes_give_the_typed_reader_a_message_or_a_counted_skip(value: bytes,
                                                                     record_headers: list[Any]) -> None:
    stream = MessageStream()
    message = stream.take(value, record_headers)
    assert (message is None) == (stream.skipped == 1)
    if message is not None:
        assert message.schema_id == "vap.frame.v1"


def test_the_reader_still_parses_a_real_message() -> None:
    stream = MessageStream()
    message = stream.take(MESSAGE, [("worker", b"w1")])
    assert message is not None and message.worker == "w1" and stream.skipped == 0


def test_the_reader_drops_a_frame_it_already_read_but_not_a_restarted_streams_reused_frame_id() -> None:
    stream = MessageStream(remembered=4)
    body = orjson.loads(MESSAGE)
    assert stream.take(MESSAGE) is not None
    assert stream.take(MESSAGE) is None and stream.duplicates == 1  # resent after a restart of vap
    restarted = orjson.dumps({**body, "captured_at": "2026-12-07T11:00:00.000Z"})  # same frame_id, later
    again = stream.take(restarted)
    assert again is not None and again.restarted is False and stream.duplicates == 1
    for frame_id in range(4, 9):  # push the first one out of the window
        assert stream.take(orjson.dumps({**body, "frame_id": frame_id})) is not None
    assert stream.take(MESSAGE) is not None, "only the last `remembered` frames of a stream are kept"
    assert stream.skipped == 0


log_records = st.lists(st.one_of(
    st.tuples(st.binary(max_size=12), st.binary(max_size=60), st.booleans()),
    st.lists(st.integers(0, 2**63), min_size=1, max_size=4)), max_size=8)


@settings(max_examples=300, deadline=None)
@given(log_records, st.data())
def test_any_torn_spool_log_gives_the_records_before_the_tear(records: list[Any], data: st.DataObject) -> None:
    encoded = [b"VAPLOG1\n"]
    for sequence, record in enumerate(records):
        if isinstance(record, tuple):
            key, value, event = record
            encoded.append(encode_message(OutgoingMessage(key, value, event, sequence=sequence)))
        else:
            encoded.append(encode_settled(record))
    whole = b"".join(encoded)
    cut = data.draw(st.integers(0, len(whole)), label="cut")
    garbage = data.draw(st.binary(max_size=40), label="garbage after the cut")
    parsed = parse_segment(whole[:cut] + garbage)
    intact = 0
    boundary = len(encoded[0])
    while intact < len(records) and boundary + len(encoded[intact + 1]) <= cut:
        boundary += len(encoded[intact + 1])
        intact += 1
    expected = {sequence: record for sequence, record in enumerate(records[:intact]) if isinstance(record, tuple)}
    assert {sequence: (m.key, m.value, m.event) for sequence, m in parsed.messages.items() if sequence < intact} \
        == expected, "every record before the tear is read back as written"
    if cut >= len(encoded[0]):
        assert parsed.good_bytes >= boundary, "the intact records are kept when the torn tail is cut off"
    if not garbage:
        assert parsed.damaged == (0 < cut != boundary), "a tear is seen exactly when the cut is inside a record"
