"""The Kafka client in its child process, against a real broker: delivery, failures, a killed child, close; and
the publisher's delivery failures with the client in either place."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from kafka import KafkaConsumer

from pipeline.config import KafkaConfig, SpoolConfig
from pipeline.frames import Detections, FrameResult
from pipeline.publishing.kafka_client import Producer, make_kafka_producer
from pipeline.publishing.kafka_process import DeliveryFuture, KafkaProcess, KafkaProcessError
from pipeline.publishing.publisher import KafkaPublisher
from pipeline.publishing.spool_log import read_log
from pipeline.tools.broker import EmbeddedBroker
from tests.conftest import closed_port_address, decode, read_topic, unused_topic, wait_until
from tests.fakes import FedPublisher, Stages, make_frame, make_result
from tests.test_publishing import zone_event

ProducerFactory = Callable[[KafkaConfig], Producer]


@pytest.fixture
def kafka_process() -> Any:
    process = KafkaProcess()
    yield process
    process.close()


@pytest.fixture(params=[True, False], ids=["client-process", "in-process"])
def producer_factory(request: pytest.FixtureRequest, kafka_process: KafkaProcess) -> ProducerFactory:
    """Producers in the child process (`kafka.client_process: true`) or in this one."""
    factory: ProducerFactory = kafka_process.open_producer if request.param else make_kafka_producer
    return factory


def start_publisher(producer_factory: ProducerFactory, broker: EmbeddedBroker, topic: str,
                    events_topic: str = "vap.events", **kafka: Any) -> tuple[FedPublisher, Callable[[str], float]]:
    """A started publisher whose producers come from `producer_factory`, and a reader of its delivery counts."""
    stages = Stages()
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic, **kafka)
    publisher = KafkaPublisher(config, stages.ledger, stages.metrics, stages.heartbeats, producer_factory,
                               events_topic=events_topic)
    publisher.start()

    def count(result: str) -> float:
        return stages.value("vap_kafka_messages_total", result=result)

    return FedPublisher(stages, publisher), count


def publish_through(kafka_process: KafkaProcess, broker: EmbeddedBroker, topic: str,
                    **kafka: Any) -> tuple[FedPublisher, Callable[[str], float]]:
    """A started publisher whose producers live in `kafka_process`, and a reader of its delivery counts."""
    return start_publisher(kafka_process.open_producer, broker, topic, **kafka)


def oversized_result(frame_id: int) -> FrameResult:
    """A result whose message is over kafka-python's max_request_size (1 MiB): Kafka will never take it."""
    detections = Detections(boxes_xyxy=np.zeros((1, 4), np.float32), confidences=np.ones(1, np.float32),
                            class_ids=np.zeros(1, np.int64))
    return FrameResult(frame=make_frame("cam-1", frame_id), task="detect", detections=detections,
                       labels={0: "x" * 1_100_000})


class CountingSends:
    """A producer factory that counts the messages handed to its producers (which it otherwise leaves alone)."""

    def __init__(self, factory: ProducerFactory) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self.sends = 0

    def __call__(self, config: KafkaConfig) -> Producer:
        return _Counted(self._factory(config), self)

    def count_one(self) -> None:
        with self._lock:
            self.sends += 1


class _Counted:
    def __init__(self, producer: Producer, counter: CountingSends) -> None:
        self._producer = producer
        self._counter = counter

    def send(self, topic: str, value: bytes, key: bytes, headers: list[tuple[str, bytes]]) -> Any:
        future = self._producer.send(topic, value=value, key=key, headers=headers)
        self._counter.count_one()
        return future

    def close(self, timeout: float | None = None) -> None:
        self._producer.close(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)


def test_a_callback_added_after_the_outcome_still_runs_once() -> None:
    delivered: list[Any] = []
    failed: list[Any] = []
    future = DeliveryFuture()
    future.add_callback(lambda tag, value: delivered.append((tag, value)), "early")
    future.resolve(None)
    future.resolve(KafkaProcessError("late, ignored"))
    future.add_callback(lambda tag, value: delivered.append((tag, value)), "late")
    future.add_errback(lambda tag, error: failed.append(tag), "never")
    assert delivered == [("early", None), ("late", None)] and failed == []

    broken = DeliveryFuture()
    broken.resolve(KafkaProcessError("gone"))
    broken.add_errback(lambda tag, error: failed.append((tag, str(error))), "after")
    assert failed == [("after", "gone")]


def test_messages_reach_the_broker_with_their_keys_and_headers_and_each_is_acknowledged(
    broker: EmbeddedBroker, kafka_process: KafkaProcess
) -> None:
    topic = unused_topic("child-client")
    producer = kafka_process.open_producer(KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic))
    assert kafka_process.pid is not None and kafka_process.pid != os.getpid()
    acknowledged: list[int] = []
    for index in range(300):
        future = producer.send(topic, value=b'{"frame_id": %d}' % index, key=b"cam-%d" % (index % 3),
                               headers=[("content-type", b"application/json")])
        future.add_callback(lambda index, _metadata: acknowledged.append(index), index)
    assert wait_until(lambda: len(acknowledged) == 300, timeout_s=20)
    assert sorted(acknowledged) == list(range(300))
    records = read_topic(broker.bootstrap_servers, topic, expected=300)
    by_key: dict[bytes, list[int]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        by_key.setdefault(record.key, []).append(decode(record)["frame_id"])
        assert record.headers == [("content-type", b"application/json")]
    assert sorted(frame_id for frame_ids in by_key.values() for frame_id in frame_ids) == list(range(300))
    for key, frame_ids in by_key.items():
        assert frame_ids == sorted(frame_ids), f"{key!r} out of order"


def test_an_unreachable_broker_fails_the_open_with_the_reason(kafka_process: KafkaProcess) -> None:
    address = closed_port_address()
    started = time.monotonic()
    with pytest.raises(KafkaProcessError, match="bootstrap"):
        kafka_process.open_producer(KafkaConfig(bootstrap_servers=address, topic="never"))
    assert time.monotonic() - started < 20


def test_an_open_fails_at_once_when_the_child_dies_before_answering(
    broker: EmbeddedBroker, kafka_process: KafkaProcess
) -> None:
    outcome: list[BaseException | None] = []
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=unused_topic("child-dies-early"))

    def open_producer() -> None:
        try:
            kafka_process.open_producer(config)
            outcome.append(None)
        except KafkaProcessError as error:
            outcome.append(error)

    opener = threading.Thread(target=open_producer)
    started = time.monotonic()
    opener.start()
    assert wait_until(lambda: kafka_process.pid is not None, timeout_s=5)
    pid = kafka_process.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # while it is still importing: it never answers
    opener.join(20)
    assert len(outcome) == 1 and isinstance(outcome[0], KafkaProcessError), outcome
    assert "exited" in str(outcome[0]) and time.monotonic() - started < 10
    assert kafka_process.open_producer(config).generation > 0, "the next open starts a new child"


def test_a_killed_child_fails_its_messages_back_and_the_publisher_delivers_all_of_them_through_a_new_one(
    broker: EmbeddedBroker, kafka_process: KafkaProcess
) -> None:
    topic = unused_topic("child-killed")
    publisher, count = publish_through(kafka_process, broker, topic)
    for frame_id in range(100):
        publisher.submit(make_result(make_frame("cam-1", frame_id)))
    assert wait_until(lambda: count("sent") >= 20, timeout_s=20)
    first_pid = kafka_process.pid
    assert first_pid is not None
    os.kill(first_pid, signal.SIGKILL)
    for frame_id in range(100, 200):
        publisher.submit(make_result(make_frame("cam-1", frame_id)))
        time.sleep(0.002)
    assert wait_until(lambda: count("sent") >= 200, timeout_s=30)
    publisher.stop(flush_timeout_s=10)
    assert publisher.join(15)
    assert kafka_process.pid not in (None, first_pid), "a new child serves the new producer"
    assert kafka_process.replacements == 1
    assert count("dropped") == 0
    records = read_topic(broker.bootstrap_servers, topic, expected=200)
    delivered = {decode(record)["frame_id"] for record in records}
    assert delivered == set(range(200)), "a message in flight when the child died is resent, never lost"


def test_a_child_that_stops_answering_is_replaced_and_its_messages_delivered_by_the_next(
    broker: EmbeddedBroker, kafka_process: KafkaProcess
) -> None:
    topic = unused_topic("child-stuck")
    publisher, count = publish_through(kafka_process, broker, topic, request_timeout_ms=1000)
    publisher.submit(make_result(make_frame("cam-1", 0)))
    assert wait_until(lambda: count("sent") == 1)
    stuck_pid = kafka_process.pid
    assert stuck_pid is not None
    os.kill(stuck_pid, signal.SIGSTOP)  # alive, but never answers again
    for frame_id in range(1, 20):
        publisher.submit(make_result(make_frame("cam-1", frame_id)))
    assert wait_until(lambda: kafka_process.pid not in (None, stuck_pid), timeout_s=20), "the stuck child is replaced"
    assert kafka_process.replacements == 1
    assert wait_until(lambda: count("sent") == 20, timeout_s=20)
    publisher.stop(flush_timeout_s=5)
    assert publisher.join(10)
    assert count("dropped") == 0
    delivered = {decode(record)["frame_id"] for record in read_topic(broker.bootstrap_servers, topic, expected=20)}
    assert delivered == set(range(20))


def test_the_child_outlives_ctrl_c_and_sigterm_so_the_pipeline_can_still_flush(
    broker: EmbeddedBroker, kafka_process: KafkaProcess
) -> None:
    topic = unused_topic("child-signals")
    producer = kafka_process.open_producer(KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic))
    pid = kafka_process.pid
    assert pid is not None
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    acknowledged = threading.Event()
    producer.send(topic, value=b"{}", key=b"cam-1", headers=[]).add_callback(lambda _m: acknowledged.set())
    assert acknowledged.wait(10)
    assert kafka_process.pid == pid


def test_a_script_without_a_main_guard_runs_once_from_a_folder_with_another_pipeline_package(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """The child is a fresh interpreter: it must not re-run the script that embeds vap, nor import a
    `pipeline` package that happens to sit in the working directory."""
    runs = tmp_path / "runs"
    elsewhere = tmp_path / "project"
    (elsewhere / "pipeline").mkdir(parents=True)
    (elsewhere / "pipeline" / "__init__.py").write_text("raise ImportError('not vap')\n", encoding="utf-8")
    script = tmp_path / "embed.py"
    script.write_text(
        "import pathlib\n"
        "from pipeline.config import KafkaConfig\n"
        "from pipeline.publishing.kafka_process import KafkaProcess\n"
        f"with open({str(runs)!r}, 'a') as log:\n"
        "    log.write('run\\n')\n"
        "process = KafkaProcess()\n"
        f"config = KafkaConfig(bootstrap_servers={broker.bootstrap_servers!r}, topic='embed')\n"
        "producer = process.open_producer(config)\n"
        "assert producer.send('embed', value=b'{}', key=b'k', headers=[]) is not None\n"
        "process.close()\n",
        encoding="utf-8",
    )
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=60, check=False,
                               cwd=elsewhere)
    assert completed.returncode == 0, completed.stderr.decode()
    assert runs.read_text(encoding="utf-8") == "run\n"


def test_close_ends_the_child_and_both_pipe_threads(broker: EmbeddedBroker) -> None:
    process = KafkaProcess()
    topic = unused_topic("child-close")
    producer = process.open_producer(KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic))
    acknowledged = threading.Event()
    producer.send(topic, value=b"{}", key=b"cam-1", headers=[]).add_callback(lambda _m: acknowledged.set())
    assert acknowledged.wait(10)
    pid = process.pid
    assert pid is not None
    process.close()
    assert not any(thread.name.startswith("kafka-pipe") for thread in threading.enumerate())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(KafkaProcessError, match="closed"):
        process.open_producer(KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic))


def test_a_message_kafka_will_never_take_is_dropped_once_and_the_ones_behind_it_are_delivered(
    broker: EmbeddedBroker, producer_factory: ProducerFactory
) -> None:
    topic = unused_topic("too-large")
    publisher, count = start_publisher(producer_factory, broker, topic)
    for frame_id in range(20):
        publisher.submit(oversized_result(frame_id) if frame_id == 5 else make_result(make_frame("cam-1", frame_id)))
    assert wait_until(lambda: count("sent") == 19 and count("dropped") == 1, timeout_s=20), \
        f"sent {count('sent')}, dropped {count('dropped')}, failed {count('failed')}"
    assert count("failed") < 5, "it is not retried"
    publisher.stop(flush_timeout_s=5)
    assert publisher.join(15)
    assert count("dropped") == 1 and count("sent") == 19 and count("failed") < 5
    delivered = sorted(decode(record)["frame_id"] for record in read_topic(broker.bootstrap_servers, topic, 19))
    assert delivered == [frame_id for frame_id in range(20) if frame_id != 5]


def test_messages_in_flight_at_stop_are_kept_in_the_spool_dir_when_the_broker_is_gone(
    producer_factory: ProducerFactory, tmp_path: Path
) -> None:
    counting = CountingSends(producer_factory)
    with EmbeddedBroker() as lost:
        publisher, count = start_publisher(counting, lost, unused_topic("in-flight-at-stop"),
                                           spool=SpoolConfig(dir=tmp_path))
        publisher.submit(make_result(make_frame("cam-1", 0)))
        assert wait_until(lambda: count("sent") == 1, timeout_s=20)
        lost.stop()
        for frame_id in range(1, 6):
            publisher.submit(make_result(make_frame("cam-1", frame_id)))
        assert wait_until(lambda: counting.sends == 6 and publisher.backlog() == 5), \
            "handed to the producer and not answered: in flight"
        publisher.stop(flush_timeout_s=0.5)
        assert publisher.join(15)
    kept = read_log(tmp_path).messages
    assert sorted(orjson.loads(message.value)["frame_id"] for message in kept) == [1, 2, 3, 4, 5]
    assert count("dropped") == 0 and count("sent") == 1


def test_a_child_replaced_before_its_reader_saw_it_die_fails_its_messages_back_at_once(
    broker: EmbeddedBroker, kafka_process: KafkaProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipe reader can lag (slow log handlers); a new open must not leave the old child's messages to
    the watchdog, which would then blame, and kill, the new child."""
    topic = unused_topic("replaced")
    with EmbeddedBroker() as doomed:
        producer = kafka_process.open_producer(KafkaConfig(bootstrap_servers=doomed.bootstrap_servers, topic=topic))
        entered, release = threading.Event(), threading.Event()
        dispatch = kafka_process._dispatch
        old_reader = next(thread for thread in kafka_process._threads if thread.name == "kafka-pipe-in")

        def lagging(reply: tuple[Any, ...]) -> None:
            if threading.current_thread() is old_reader:
                entered.set()
                release.wait(20)
            dispatch(reply)

        monkeypatch.setattr(kafka_process, "_dispatch", lagging)
        futures = [producer.send(topic, b"first", b"cam-1", [])]
        assert entered.wait(10), "the child never answered"
    futures += [producer.send(topic, b"%d" % index, b"cam-1", []) for index in range(5)]  # broker gone
    old_pid = kafka_process.pid
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    time.sleep(0.2)  # the kill lands; the open below must find the child gone, not race it
    try:
        kafka_process.open_producer(KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic))
        assert wait_until(lambda: all(future.is_done for future in futures), timeout_s=2), "messages left waiting"
        assert all(isinstance(future.exception, KafkaProcessError) for future in futures)
        assert kafka_process.pid != old_pid
        with pytest.raises(ChildProcessError):
            os.waitpid(old_pid, os.WNOHANG)
    finally:
        release.set()


def test_a_child_that_keeps_answering_is_not_killed_by_the_watchdog(kafka_process: KafkaProcess) -> None:
    """With the broker away, each send to a topic without metadata blocks the child for max_block_ms; it is
    slow, not stuck, and a kill would resend what the broker may already hold."""
    with EmbeddedBroker() as going:
        config = KafkaConfig(bootstrap_servers=going.bootstrap_servers, topic=unused_topic("slow"),
                             request_timeout_ms=1000)
        producer = kafka_process.open_producer(config)
        pid = kafka_process.pid
    futures = [producer.send(unused_topic("no-metadata"), b"event", b"cam-1", []) for _ in range(8)]
    assert wait_until(lambda: all(future.is_done for future in futures), timeout_s=30)
    assert kafka_process.pid == pid, "the watchdog replaced a child that answered every second"


LOGGING_BUT_STUCK_CHILD = r'''
import json, os, sys, threading, time
sys.path[:0] = json.loads(sys.argv[1])
from multiprocessing.connection import Connection
pipe, lock = Connection(int(sys.argv[2])), threading.Lock()
def answer():
    while True:
        try:
            requests = pipe.recv()
        except (EOFError, OSError):
            os._exit(0)
        for request in requests:
            if request[0] == "open":
                with lock:
                    pipe.send([("opened", request[1], None)])
            if request[0] == "exit":
                os._exit(0)
threading.Thread(target=answer, daemon=True).start()
while True:
    time.sleep(0.3)
    with lock:
        pipe.send([("log", "kafka.producer", 40, "Uncaught error in kafka producer I/O thread")])
'''


def test_a_child_that_only_logs_while_holding_a_message_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """kafka-python's sender loop logs on every turn while it is broken: log lines are not answers."""
    import pipeline.publishing.kafka_process as kafka_process_module

    monkeypatch.setattr(kafka_process_module, "_CHILD_BOOTSTRAP", LOGGING_BUT_STUCK_CHILD)
    process = KafkaProcess()
    try:
        producer = process.open_producer(KafkaConfig(bootstrap_servers=closed_port_address(), topic="t",
                                                     request_timeout_ms=1000))
        future = producer.send("t", b"value", b"cam-1", [])
        assert wait_until(lambda: future.is_done, timeout_s=10), "the stuck child was never replaced"
        assert isinstance(future.exception, KafkaProcessError)
    finally:
        process.close(1.0)


@contextlib.contextmanager
def paused(broker: EmbeddedBroker) -> Iterator[None]:
    """The broker process stopped (alive, connections open, silent) until the block ends."""
    process = broker._process
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


def frame_ids_by_stream(bootstrap: str, topic: str, frame_ids: range, timeout_s: float = 30.0) -> dict[str, list[int]]:
    """Each stream's frame ids in the order the topic holds them, read until both streams' `frame_ids` came."""
    expected = {(stream_id, frame_id) for stream_id in STREAMS for frame_id in frame_ids}
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False)
    seen: set[tuple[str, int]] = set()
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not expected <= seen and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
                seen.update((decode(record)["stream_id"], decode(record)["frame_id"]) for record in batch)
    finally:
        consumer.close()
    by_stream: dict[str, list[int]] = {stream_id: [] for stream_id in STREAMS}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        message = decode(record)
        by_stream[message["stream_id"]].append(message["frame_id"])
    return by_stream


def assert_every_stream_complete_and_in_order(by_stream: dict[str, list[int]], frame_ids: range) -> None:
    for stream_id in STREAMS:
        assert set(by_stream[stream_id]) == set(frame_ids), f"{stream_id}: messages missing"
        delivered = first_deliveries(by_stream[stream_id])
        assert delivered == sorted(delivered), f"{stream_id} out of order"


def first_deliveries(frame_ids: list[int]) -> list[int]:
    """Without the repeats at-least-once delivery allows (a message that timed out on the producer's side
    may still have reached the broker, and is sent again)."""
    return list(dict.fromkeys(frame_ids))


STREAMS = ("cam-1", "cam-2")


def submit_frames(publisher: FedPublisher, frame_ids: range, every_s: float = 0.01) -> None:
    """Two streams, as cameras give them: frame ids shared, one result per stream per tick."""
    for frame_id in frame_ids:
        for stream_id in STREAMS:
            publisher.submit(make_result(make_frame(stream_id, frame_id)))
        time.sleep(every_s)


def test_after_the_broker_stops_answering_for_a_while_every_message_is_delivered_and_each_stream_stays_in_order(
    producer_factory: ProducerFactory
) -> None:
    """kafka-python has been seen never to answer again after its broker was silent for a few seconds."""
    topic = unused_topic("paused")
    with EmbeddedBroker() as broker:
        publisher, count = start_publisher(producer_factory, broker, topic, request_timeout_ms=1000, partitions=1,
                                           spool=SpoolConfig(max_messages=10_000))
        try:
            submit_frames(publisher, range(0, 100))
            # Three delivery timeouts (2 s each here): what the producer held when the broker stopped answering
            # has failed back before it answers again, so no message can be delivered before an older retry.
            with paused(broker):
                submit_frames(publisher, range(100, 700))
            submit_frames(publisher, range(700, 800))
            assert wait_until(lambda: count("sent") == 1600, timeout_s=60), \
                f"sent {count('sent')} of 1600, {publisher.backlog()} still waiting"
        finally:
            publisher.stop(flush_timeout_s=5)
            assert publisher.join(15)
        assert count("dropped") == 0
        by_stream = frame_ids_by_stream(broker.bootstrap_servers, topic, range(800))
    assert_every_stream_complete_and_in_order(by_stream, range(800))


def test_after_a_broker_restart_every_message_of_the_outage_reaches_the_new_broker_with_each_stream_in_order(
    producer_factory: ProducerFactory
) -> None:
    """The restarted broker has forgotten the producer's id: its producer is rebuilt and the spool resent."""
    topic = unused_topic("restarted")
    broker = EmbeddedBroker().start()
    try:
        publisher, count = start_publisher(producer_factory, broker, topic, request_timeout_ms=1000,
                                           spool=SpoolConfig(max_messages=10_000))
        try:
            submit_frames(publisher, range(0, 50))
            assert wait_until(lambda: count("sent") == 100, timeout_s=20)
            broker.stop()
            submit_frames(publisher, range(50, 650))  # 6 s: see the test with a paused broker
            broker.start()
            submit_frames(publisher, range(650, 750))
            assert wait_until(lambda: count("sent") == 1500, timeout_s=60), \
                f"sent {count('sent')} of 1500, {publisher.backlog()} still waiting"
        finally:
            publisher.stop(flush_timeout_s=5)
            assert publisher.join(15)
        assert count("dropped") == 0
        by_stream = frame_ids_by_stream(broker.bootstrap_servers, topic, range(50, 750))
    finally:
        broker.stop()
    assert_every_stream_complete_and_in_order(by_stream, range(50, 750))


def test_messages_kept_at_a_stop_while_the_broker_is_silent_are_kept_and_resent_in_order(
    producer_factory: ProducerFactory, tmp_path: Path
) -> None:
    topic = unused_topic("kept-in-order")
    with EmbeddedBroker() as broker:
        publisher, count = start_publisher(producer_factory, broker, topic, spool=SpoolConfig(dir=tmp_path))
        submit_frames(publisher, range(0, 5), every_s=0)
        assert wait_until(lambda: count("sent") == 10, timeout_s=20)
        with paused(broker):
            submit_frames(publisher, range(5, 200), every_s=0.002)
            assert wait_until(lambda: publisher.backlog() == 390, timeout_s=20)
            publisher.stop(flush_timeout_s=0.5)
            assert publisher.join(15)
        kept = read_log(tmp_path).messages
        for stream_id in STREAMS:
            frame_ids = [orjson.loads(m.value)["frame_id"] for m in kept if m.key.decode() == stream_id]
            assert frame_ids == list(range(5, 200)), f"{stream_id}: the file is out of order or incomplete"
        assert count("dropped") == 0
        publisher, count = start_publisher(producer_factory, broker, topic, spool=SpoolConfig(dir=tmp_path))
        try:
            assert wait_until(lambda: count("sent") == 390, timeout_s=30)
        finally:
            publisher.stop(flush_timeout_s=5)
            assert publisher.join(15)
        by_stream = frame_ids_by_stream(broker.bootstrap_servers, topic, range(200))
    assert_every_stream_complete_and_in_order(by_stream, range(200))


def test_the_events_topic_is_created_like_the_results_topic_and_zone_events_reach_it(
    broker: EmbeddedBroker, producer_factory: ProducerFactory
) -> None:
    """Created by vap with the configured partitions, not left to a broker's auto-creation (which Tansu does,
    with four partitions; a cluster with auto-creation off would refuse every event)."""
    topic, events_topic = unused_topic("frames"), unused_topic("events")
    publisher, count = start_publisher(producer_factory, broker, topic, events_topic=events_topic, partitions=2)
    try:
        publisher.submit(make_result(make_frame("cam-1", 0)))
        publisher.submit(zone_event(0))
        publisher.submit(make_result(make_frame("cam-1", 1)))
        assert wait_until(lambda: count("sent") == 3, timeout_s=20)
    finally:
        publisher.stop(flush_timeout_s=5)
        assert publisher.join(15)
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers)
    try:
        assert consumer.partitions_for_topic(events_topic) == {0, 1}
    finally:
        consumer.close()
    records = read_topic(broker.bootstrap_servers, events_topic, expected=1)
    assert [decode(record)["schema"] for record in records] == ["vap.event.v1"]
    assert dict(records[0].headers)["schema"] == b"vap.event.v1"
