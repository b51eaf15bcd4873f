"""Fleet mode in one process: two pipelines share the cameras through a real broker's group protocol.

The model is a stand-in (the fleet neither knows nor cares what infers); the registry, the group, the
control API and the results topic are real. Replicas as separate processes, killed and frozen, are in
`test_fleet_processes.py`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from pipeline.app import Pipeline
from pipeline.config import PipelineConfig
from pipeline.errors import StreamExists
from pipeline.inference.detector import Detector
from pipeline.tools import streams as streams_command
from pipeline.tools.broker import EmbeddedBroker, free_port
from pipeline.tools.fleet_lab import partition_of, spread_ids
from tests.conftest import ConfigFactory, closed_port_address, read_topic, sample, unused_topic, wait_for
from tests.conftest import http_call as call
from tests.fakes import InstantDetector

PARTITIONS = 8
# The API adds network cameras only; these tests check who runs a stream, not its frames, so one that refuses
# connections at once will do.
NETWORK_CAMERA = f"rtsp://{closed_port_address()}/api-added"


def instant(_config: PipelineConfig, _device: str) -> Detector:
    return InstantDetector()


class Fleet:
    """Replicas of one config in this process, each with its own worker id."""

    def __init__(self, broker: EmbeddedBroker, clip: Path, make_config: ConfigFactory, stream_ids: list[str]) -> None:
        self.broker = broker
        self.topic = unused_topic("fleet")
        self.fleet: dict[str, Any] = {"group": unused_topic("group"), "streams_topic": unused_topic("registry"),
                      "partitions": PARTITIONS, "session_timeout_ms": 6000}
        self.streams = [{"id": stream_id, "url": str(clip), "loop": True} for stream_id in stream_ids]
        self.make_config = make_config
        self.replicas: dict[str, Pipeline] = {}

    def start(self, worker: str, streams: list[dict[str, Any]] | None = None) -> Pipeline:
        config = self.make_config(self.streams if streams is None else streams, self.broker.bootstrap_servers,
                                  self.topic, fleet={**self.fleet, "worker_id": worker},
                                  tracking={"events_topic": f"{self.topic}-events"})
        pipeline = Pipeline(config, detector_factory=instant)
        self.replicas[worker] = pipeline
        pipeline.start()
        return pipeline

    def running(self) -> dict[str, list[str]]:
        """Stream id -> the replicas running it now."""
        where: dict[str, list[str]] = {}
        for worker, pipeline in self.replicas.items():
            if not pipeline.stopping:
                for stream_id in pipeline.local_streams():
                    where.setdefault(stream_id, []).append(worker)
        return where

    def settled(self, stream_ids: set[str], workers: set[str]) -> bool:
        where = self.running()
        return (set(where) == stream_ids and all(len(owners) == 1 for owners in where.values())
                and {owners[0] for owners in where.values()} == workers)

    def stop(self) -> None:
        for pipeline in self.replicas.values():
            pipeline.stop()

    def first_replica(self) -> Pipeline:
        """Replica a, once it runs every stream of the file."""
        a = self.start("a")
        wanted = {str(stream["id"]) for stream in self.streams}
        wait_for(lambda: set(a.local_streams()) == wanted, 30, f"a did not run {sorted(wanted)}")
        return a


@pytest.fixture
def fleet_of(broker: EmbeddedBroker, clips: dict[str, Path], make_config: ConfigFactory) -> Any:
    made: list[Fleet] = []

    def build(stream_ids: list[str]) -> Fleet:
        fleet = Fleet(broker, clips["landscape"], make_config, stream_ids)
        made.append(fleet)
        return fleet

    yield build
    for fleet in made:
        fleet.stop()


def test_two_replicas_share_the_streams_and_the_api_of_either_changes_the_fleet(fleet_of: Any) -> None:
    stream_ids = spread_ids(4, PARTITIONS)
    fleet: Fleet = fleet_of(stream_ids)
    a = fleet.first_replica()
    b = fleet.start("b")
    wait_for(lambda: fleet.settled(set(stream_ids), {"a", "b"}), 30,
             f"the streams were not shared out: {fleet.running()}")
    assert sorted(len(a.local_streams()) for a in fleet.replicas.values()) == [2, 2]
    assert a.http is not None and b.http is not None
    code, info = call(a.http.port, "GET", "/api/v1/fleet")
    assert code == 200 and info["worker_id"] == "a" and info["members"] == ["a", "b"]
    _, info_b = call(b.http.port, "GET", "/api/v1/fleet")
    assert set(info["partitions"]) | set(info_b["partitions"]) == set(range(PARTITIONS))
    assert not set(info["partitions"]) & set(info_b["partitions"])
    assert sorted(info["streams"]) == sorted(a.local_streams())
    assert sample(a, "vap_fleet_streams", worker="a") == 2
    assert sample(a, "vap_fleet_rebalances_total") >= 2

    added = next(candidate for candidate in spread_ids(PARTITIONS, PARTITIONS, prefix="added")
                 if partition_of(candidate, PARTITIONS) in info_b["partitions"])
    asked = time.monotonic()
    code, _ = call(a.http.port, "POST", "/api/v1/streams", {"id": added, "url": NETWORK_CAMERA})
    assert code == 201
    wait_for(lambda: added in b.local_streams(), 5, "a stream added through a's API did not start on its owner b")
    print(f"added through a, running on b after {time.monotonic() - asked:.2f} s")
    assert added not in a.local_streams()
    assert call(b.http.port, "POST", "/api/v1/streams", {"id": added, "url": "rtsp://192.0.2.1/x"})[0] == 409
    code, _ = call(a.http.port, "DELETE", f"/api/v1/streams/{added}")
    assert code == 204
    wait_for(lambda: added not in b.local_streams(), 5, "a stream removed through a's API kept running on b")
    assert call(a.http.port, "DELETE", "/api/v1/streams/never-there")[0] == 404

    owned_by_b = set(b.local_streams())
    wait_for(lambda: all(sample(b, "vap_frames_processed_total", stream=s) >= 3 for s in owned_by_b), 20,
             "b published nothing")
    b.stop()  # a drained replica (SIGTERM) hands its streams over at once
    handed = time.monotonic()
    wait_for(lambda: set(a.local_streams()) == set(stream_ids), 20, "a did not take over b's streams")
    print(f"b stopped; a ran its streams {time.monotonic() - handed:.2f} s later")
    totals = b.ledger.overall()
    assert totals.read == totals.published + totals.dropped, "b lost frames uncounted when it handed over"

    wait_for(lambda: all(sample(a, "vap_frames_processed_total", stream=s) >= 3 for s in owned_by_b), 20,
             "a published nothing for the streams it took over")
    a.stop()
    records = read_topic(fleet.broker.bootstrap_servers, fleet.topic, expected=a.ledger.published_total
                         + b.ledger.published_total, timeout_s=20)
    workers = [dict(record.headers).get("worker") for record in records]
    assert set(workers) == {b"a", b"b"}, "every result names the replica that published it"
    by_b = [record for record in records if dict(record.headers)["worker"] == b"b"]
    assert len(by_b) == b.ledger.published_total


def test_bad_registry_records_are_skipped_counted_and_never_stop_a_replica(
        fleet_of: Any, caplog: pytest.LogCaptureFixture) -> None:
    stream_ids = spread_ids(2, PARTITIONS)
    fleet: Fleet = fleet_of(stream_ids)
    a = fleet.first_replica()
    producer = KafkaProducer(bootstrap_servers=fleet.broker.bootstrap_servers)
    registry = fleet.fleet["streams_topic"]
    good = {"id": "late", "url": fleet.streams[0]["url"], "loop": True}
    try:
        producer.send(registry, key=b"garbage", value=b"\x00 not json")
        producer.send(registry, key=b"cam-bad", value=json.dumps({"id": "cam-bad", "url": "ftp://nope"}).encode())
        producer.send(registry, key=None, value=b"{}")
        producer.send(registry, key=b"unknown-id", value=None)  # a tombstone for an id never seen
        producer.send(registry, key=b"late", value=json.dumps(good).encode())
        producer.flush(10)
    finally:
        producer.close()
    wait_for(lambda: "late" in a.local_streams(), 10, "a valid record after bad ones was not applied")
    assert sample(a, "vap_fleet_registry_invalid_total") == 3
    skipped = [r.getMessage() for r in caplog.records if "skipped the record" in r.getMessage()]
    assert any("'garbage'" in line and "not JSON" in line for line in skipped), skipped
    assert any("'cam-bad'" in line and "url" in line for line in skipped), skipped
    assert not a.heartbeats.dead()


def test_two_files_that_disagree_about_a_stream_warn_naming_both_and_the_last_write_wins(
        fleet_of: Any, caplog: pytest.LogCaptureFixture) -> None:
    stream_ids = spread_ids(1, PARTITIONS)
    fleet: Fleet = fleet_of(stream_ids)
    fleet.first_replica()
    changed = [{**fleet.streams[0], "fps": 2}]
    with caplog.at_level(logging.WARNING):
        fleet.start("b", streams=changed)
    warnings = [r.getMessage() for r in caplog.records if "defined differently" in r.getMessage()]
    assert len(warnings) == 1 and " on a" in warnings[0] and " on b" in warnings[0], warnings
    wait_for(lambda: any(config.fps == 2 for p in fleet.replicas.values() for config in p.local_streams().values()),
             15, "the last write did not win")


def test_a_stream_the_file_no_longer_has_leaves_the_registry_but_api_streams_stay(fleet_of: Any) -> None:
    first, second = spread_ids(2, PARTITIONS)
    fleet: Fleet = fleet_of([first, second])
    a = fleet.first_replica()
    assert a.http is not None
    api_stream = {"id": "from-api", "url": NETWORK_CAMERA}
    assert call(a.http.port, "POST", "/api/v1/streams", api_stream)[0] == 201
    wait_for(lambda: "from-api" in a.local_streams(), 10, "the API's stream did not start")
    a.stop()
    b = fleet.start("b", streams=[fleet.streams[0]])  # restarted with a file that dropped `second`
    wait_for(lambda: set(b.local_streams()) == {first, "from-api"}, 30,
             f"expected the file's stream and the API's, got {sorted(b.local_streams())}")


def test_in_fleet_mode_the_registry_is_the_way_in(fleet_of: Any) -> None:
    stream_ids = spread_ids(1, PARTITIONS)
    fleet: Fleet = fleet_of(stream_ids)
    a = fleet.first_replica()
    with pytest.raises(StreamExists):
        a.add_stream(a.local_streams()[stream_ids[0]])


def test_without_a_fleet_section_the_fleet_api_says_it_is_off(
        broker: EmbeddedBroker, clips: dict[str, Path], make_config: ConfigFactory) -> None:
    config = make_config([{"id": "solo", "url": str(clips["landscape"])}], broker.bootstrap_servers,
                         unused_topic("solo"))
    pipeline = Pipeline(config, detector_factory=instant)
    pipeline.start()
    try:
        assert pipeline.http is not None
        code, body = call(pipeline.http.port, "GET", "/api/v1/fleet")
        assert code == 404 and "fleet" in body["detail"]
        assert "vap_fleet_streams" not in pipeline.registry._names_to_collectors
    finally:
        pipeline.stop()


def test_the_streams_command_and_a_reloaded_file_change_a_running_fleet(
        fleet_of: Any, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = spread_ids(2, PARTITIONS)
    fleet: Fleet = fleet_of([first, second])
    a = fleet.first_replica()
    registry = streams_command.registry_from(None, None, fleet.broker.bootstrap_servers, fleet.fleet["streams_topic"])
    added = streams_command.stream_from("from-cli", str(fleet.streams[0]["url"]), ["loop=true"], None)
    assert streams_command.add_stream(registry, added, replace=False) == 0  # what `vap streams add` runs
    wait_for(lambda: "from-cli" in a.local_streams(), 10, "a stream added by `vap streams add` did not start")
    assert streams_command.remove_stream(registry, "from-cli") == 0
    wait_for(lambda: "from-cli" not in a.local_streams(), 10, "a stream removed by `vap streams remove` kept running")
    capsys.readouterr()
    assert a.sync_file_streams([a.local_streams()[first]])  # what a reload of a file without `second` does
    wait_for(lambda: set(a.local_streams()) == {first}, 10, "a stream deleted from the file kept running")


def test_the_leader_rebalances_when_new_streams_pile_up_on_one_replica(fleet_of: Any) -> None:
    stream_ids = spread_ids(2, PARTITIONS)
    fleet: Fleet = fleet_of(stream_ids)
    a = fleet.start("a")
    b = fleet.start("b")
    wait_for(lambda: fleet.settled(set(stream_ids), {"a", "b"}), 40, f"not shared out: {fleet.running()}")
    assert a.http is not None
    _, info = call(a.http.port, "GET", "/api/v1/fleet")
    piled = [candidate for candidate in spread_ids(PARTITIONS, PARTITIONS, prefix="pile")
             if partition_of(candidate, PARTITIONS) in info["partitions"]][:2]
    for stream_id in piled:
        assert call(a.http.port, "POST", "/api/v1/streams", {"id": stream_id, "url": NETWORK_CAMERA})[0] == 201
    everything = {*stream_ids, *piled}
    wait_for(lambda: set(fleet.running()) == everything and sorted(
        len(p.local_streams()) for p in (a, b)) == [2, 2], 30,
        f"four streams were not spread two and two: {fleet.running()}")


def test_a_replica_that_starts_before_its_broker_joins_once_the_broker_is_there(
        clips: dict[str, Path], make_config: ConfigFactory, pipelines: list[Pipeline]) -> None:
    late = EmbeddedBroker(port=free_port())
    [stream_id] = spread_ids(1, PARTITIONS)
    config = make_config([{"id": stream_id, "url": str(clips["landscape"]), "loop": True}], late.bootstrap_servers,
                         unused_topic("late"), fleet={"worker_id": "early", "partitions": PARTITIONS,
                                                      "session_timeout_ms": 6000},
                         kafka={"client_process": False})
    pipeline = Pipeline(config, detector_factory=instant)
    pipelines.append(pipeline)
    pipeline.start()
    info = pipeline.fleet_info()
    assert info is not None and info["state"] == "waiting for Kafka" and pipeline.ready
    with late:
        wait_for(lambda: stream_id in pipeline.local_streams(), 60, "the replica did not join once Kafka was there")
        fleet = pipeline.fleet_info()
        assert fleet is not None and fleet["state"] == "member"
        pipeline.stop()
