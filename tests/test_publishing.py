"""Publisher accounting with a fake producer: nothing is lost without being counted."""

from __future__ import annotations

import threading
import time

import orjson
from prometheus_client import CollectorRegistry

from pipeline.config import KafkaConfig, SpoolConfig
from pipeline.health import Heartbeats
from pipeline.metrics import PipelineMetrics
from pipeline.publishing import KafkaPublisher, Producer
from tests.conftest import wait_until
from tests.fakes import FakeProducer, make_frame, make_result


class Harness:
    def __init__(self, spool_max_messages: int = 100, broker_up: bool = True) -> None:
        self.registry = CollectorRegistry()
        self.metrics = PipelineMetrics(self.registry)
        self.available = threading.Event()
        if broker_up:
            self.available.set()
        self.producers: list[FakeProducer] = []
        config = KafkaConfig(spool=SpoolConfig(max_messages=spool_max_messages))
        self.publisher = KafkaPublisher(config, "test-model", self.metrics, Heartbeats(self.metrics), self._factory)

    def _factory(self, _config: KafkaConfig) -> Producer:
        producer = FakeProducer(self.available)
        self.producers.append(producer)
        return producer

    def count(self, result: str) -> float:
        return self.registry.get_sample_value("vap_kafka_messages_total", {"result": result}) or 0.0

    def sent_frame_ids(self) -> list[int]:
        return [orjson.loads(value)["frame_id"] for producer in self.producers for _, value in producer.sent]


def test_every_message_is_sent_keyed_by_stream_in_order() -> None:
    harness = Harness()
    harness.publisher.start()
    for frame_id in range(20):
        harness.publisher.submit(make_result(make_frame("cam-1", frame_id)))
    assert wait_until(lambda: harness.count("sent") == 20)
    harness.publisher.stop(flush_timeout_s=2)
    assert harness.publisher.join(5)
    assert harness.sent_frame_ids() == list(range(20))
    assert {key for producer in harness.producers for key, _ in producer.sent} == {b"cam-1"}
    assert harness.count("dropped") == 0 and harness.count("failed") == 0


def test_broker_outage_spools_within_bound_and_counts_the_oldest_dropped() -> None:
    harness = Harness(spool_max_messages=10, broker_up=False)
    harness.publisher.start()
    for frame_id in range(25):
        harness.publisher.submit(make_result(make_frame("cam-1", frame_id)))
    assert wait_until(lambda: harness.count("dropped") == 15)
    assert wait_until(lambda: harness.count("failed") >= 1)
    harness.available.set()
    assert wait_until(lambda: harness.count("sent") == 10)
    harness.publisher.stop(flush_timeout_s=2)
    assert harness.publisher.join(5)
    assert sorted(harness.sent_frame_ids()) == list(range(15, 25))


def test_a_producer_that_keeps_failing_is_replaced_and_the_spool_resent() -> None:
    harness = Harness(broker_up=False)
    harness.publisher.start()
    for frame_id in range(5):
        harness.publisher.submit(make_result(make_frame("cam-1", frame_id)))
    assert wait_until(lambda: len(harness.producers) >= 2)
    harness.available.set()
    assert wait_until(lambda: harness.count("sent") == 5)
    harness.publisher.stop(flush_timeout_s=2)
    assert harness.publisher.join(5)
    assert harness.producers[0].closed
    assert harness.sent_frame_ids() == list(range(5))


def test_stop_counts_undeliverable_messages_as_dropped_within_the_deadline() -> None:
    harness = Harness(broker_up=False)
    harness.publisher.start()
    for frame_id in range(7):
        harness.publisher.submit(make_result(make_frame("cam-1", frame_id)))
    assert wait_until(lambda: harness.publisher.backlog() == 7)
    started = time.monotonic()
    harness.publisher.stop(flush_timeout_s=0.5)
    assert harness.publisher.join(5)
    assert time.monotonic() - started < 4
    assert harness.count("dropped") == 7 and harness.count("sent") == 0


def test_results_are_counted_and_spooled_while_a_slow_producer_opens() -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    may_open = threading.Event()
    opened: list[FakeProducer] = []
    up = threading.Event()
    up.set()

    def slow_factory(_config: KafkaConfig) -> Producer:
        may_open.wait(30)
        opened.append(FakeProducer(up))
        return opened[-1]

    publisher = KafkaPublisher(KafkaConfig(), "test-model", metrics, Heartbeats(metrics), slow_factory)
    publisher.start()
    for frame_id in range(5):
        publisher.submit(make_result(make_frame("cam-1", frame_id)))
    assert wait_until(lambda: registry.get_sample_value("vap_frames_processed_total", {"stream": "cam-1"}) == 5,
                      timeout_s=3), \
        "the publisher loop must not wait for the producer to open"
    assert registry.get_sample_value("vap_queue_depth", {"stage": "kafka_spool"}) == 5
    may_open.set()
    assert wait_until(lambda: registry.get_sample_value("vap_kafka_messages_total", {"result": "sent"}) == 5)
    publisher.stop(flush_timeout_s=1)
    assert publisher.join(5)
    assert opened[0].closed
