"""The fleet's rules without a broker: how partitions are weighed and handed out, and which registry records
count."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from pipeline.config import StreamConfig
from pipeline.fleet.assignor import MemberInfo, StreamAssignor, balance, first_step
from pipeline.fleet.registry import InvalidRecord, RegistryView, encode_stream, registry_headers

PARTITIONS = list(range(16))


def loads(assignment: dict[str, set[int]], weights: dict[int, int]) -> dict[str, int]:
    return {member: sum(weights.get(p, 0) for p in partitions) for member, partitions in assignment.items()}


def covers_each_partition_once(assignment: dict[str, set[int]], partitions: list[int]) -> bool:
    handed = [p for owned in assignment.values() for p in owned]
    return sorted(handed) == sorted(partitions)


def test_streams_are_spread_not_partitions() -> None:
    weights = {3: 1, 4: 1, 5: 1, 6: 1, 7: 1, 8: 1}  # six cameras in six partitions, next to each other
    assignment = balance(PARTITIONS, weights, {"a": [], "b": [], "c": []})
    assert covers_each_partition_once(assignment, PARTITIONS)
    assert sorted(loads(assignment, weights).values()) == [2, 2, 2]
    assert sorted(len(owned) for owned in assignment.values()) == [5, 5, 6]


def test_an_unbalanced_history_is_rebalanced_with_the_fewest_moves() -> None:
    weights = {p: 1 for p in range(6)}
    owned = {"a": list(range(16)), "b": [], "c": []}  # a ran everything alone; b and c just joined
    assignment = balance(PARTITIONS, weights, owned)
    assert sorted(loads(assignment, weights).values()) == [2, 2, 2]
    kept = {p for p in assignment["a"] if weights.get(p)}
    assert len(kept) == 2, "a keeps two of its cameras rather than giving all away"


def test_a_balanced_assignment_is_kept_as_it_is() -> None:
    weights = {0: 1, 1: 1, 2: 1, 3: 1}
    owned = {"a": [0, 1, 8, 9, 10, 11, 12, 13], "b": [2, 3, 4, 5, 6, 7, 14, 15]}
    assert balance(PARTITIONS, weights, owned) == {member: set(p) for member, p in owned.items()}


def test_a_dead_members_partitions_go_to_the_least_loaded() -> None:
    weights = {0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1}
    # c died: its partitions 4 and 5 are nobody's now
    assignment = balance(PARTITIONS, weights, {"a": [0, 1, 6, 7, 8, 9, 10], "b": [2, 3, 11, 12, 13, 14, 15]})
    assert covers_each_partition_once(assignment, PARTITIONS)
    assert sorted(loads(assignment, weights).values()) == [3, 3]
    assert {0, 1} <= assignment["a"] and {2, 3} <= assignment["b"]


def test_a_partition_with_two_streams_counts_twice() -> None:
    weights = {0: 2, 1: 1, 2: 1}
    assignment = balance(PARTITIONS, weights, {"a": [], "b": []})
    assert sorted(loads(assignment, weights).values()) == [2, 2]


def test_owned_partitions_that_no_longer_exist_or_are_claimed_twice_are_dropped() -> None:
    assignment = balance([0, 1, 2, 3], {}, {"a": [0, 1, 99], "b": [1, 2]})
    assert covers_each_partition_once(assignment, [0, 1, 2, 3])


def test_no_members_no_assignment() -> None:
    assert balance(PARTITIONS, {0: 1}, {}) == {}


def test_a_moving_partition_is_held_back_until_its_owner_lets_go() -> None:
    owned = {"a": {0, 1, 2}, "b": set()}
    target = {"a": {0, 1}, "b": {2}}
    assert first_step(target, owned) == {"a": {0, 1}, "b": set()}
    # the next round: a reports it no longer owns 2
    assert first_step(target, {"a": {0, 1}, "b": set()}) == target


def test_member_info_round_trips_and_survives_garbage() -> None:
    info = MemberInfo("w-1", frozenset({3, 1}))
    assert MemberInfo.decode(info.encode()) == info
    assert MemberInfo.decode(b"\xff not json") == MemberInfo("", frozenset())
    assert MemberInfo.decode(None) == MemberInfo("", frozenset())
    assert MemberInfo.decode(b'{"owned": "x"}') == MemberInfo("", frozenset())


class _Member:
    def __init__(self, member_id: str, info: MemberInfo) -> None:
        self.member_id = member_id
        self.metadata = type("Metadata", (), {"user_data": info.encode()})()


class _Cluster:
    def partitions_for_topic(self, _topic: str) -> set[int]:
        return set(range(8))


def test_the_assignor_tells_every_member_the_fleet_and_holds_back_moves() -> None:
    heard: list[tuple[frozenset[int], list[str], int]] = []
    assignor = StreamAssignor("reg", "a", lambda: {0: 1, 1: 1, 2: 1, 3: 1},
                              lambda owned, workers, generation: heard.append((owned, workers, generation)))
    members = [_Member("m-a", MemberInfo("a", frozenset(range(8)))), _Member("m-b", MemberInfo("b", frozenset()))]
    result = assignor.assign(_Cluster(), members)
    assert assignor.last_target["m-b"], "b is meant to get partitions"
    assert result["m-b"].partitions() == [], "but only once a has let them go"
    assignor.on_assignment(result["m-a"], 7)
    assert assignor.leading
    owned, workers, generation = heard[-1]
    assert workers == ["a", "b"] and generation == 7
    assert owned == frozenset(assignor.last_target["m-a"])
    metadata = assignor.metadata({"reg"})
    assert MemberInfo.decode(metadata.user_data).owned == owned


def stream_record(stream_id: str, **fields: Any) -> bytes:
    return encode_stream(StreamConfig(id=stream_id, url=f"rtsp://192.0.2.1/{stream_id}", **fields))


def test_the_registry_view_follows_upserts_and_tombstones() -> None:
    view = RegistryView()
    change = view.apply(3, b"cam-1", stream_record("cam-1"), registry_headers("api", "w1"))
    assert change is not None and change.entry is not None
    assert change.entry.origin == "api" and change.entry.writer == "w1" and change.entry.partition == 3
    assert view.apply(3, b"cam-1", stream_record("cam-1"), registry_headers("api", "w1")) is None, "no change"
    updated = view.apply(3, b"cam-1", stream_record("cam-1", fps=5), registry_headers("file", "w2", "/a.yaml"))
    assert updated is not None and updated.entry is not None and updated.entry.stream.fps == 5
    removed = view.apply(3, b"cam-1", None, [])
    assert removed is not None and removed.entry is None and view.entries == {}
    assert view.apply(3, b"never-seen", None, []) is None, "a tombstone for an unknown id is ignored"


def test_only_what_differs_from_the_defaults_is_written() -> None:
    assert orjson.loads(stream_record("cam-1", fps=5)) == {"id": "cam-1", "url": "rtsp://192.0.2.1/cam-1", "fps": 5.0}


@pytest.mark.parametrize(("key", "value", "problem"), [
    (None, b"{}", "no key"),
    (b"bad id!", b"{}", "not a stream id"),
    (b"cam-1", b"not json", "not JSON"),
    (b"cam-1", b'{"id": "cam-1"}', "url"),
    (b"cam-1", b'{"id": "cam-1", "url": "rtsp://x/y", "fps": -1}', "fps"),
    (b"cam-1", b'{"id": "cam-2", "url": "rtsp://x/y"}', "not its key"),
    (b"cam-1", b'["a list"]', "not a valid stream config"),
])
def test_a_record_that_is_not_a_stream_is_refused_and_changes_nothing(key: bytes | None, value: bytes,
                                                                       problem: str) -> None:
    view = RegistryView()
    view.apply(0, b"cam-1", stream_record("cam-1"), [])
    before = dict(view.entries)
    with pytest.raises(InvalidRecord, match=problem):
        view.apply(0, key, value, [])
    assert view.entries == before


def test_streams_per_partition_weighs_each_partition() -> None:
    view = RegistryView()
    for partition, stream_id in [(1, "a"), (1, "b"), (4, "c")]:
        view.apply(partition, stream_id.encode(), stream_record(stream_id), [])
    assert view.streams_per_partition() == {1: 2, 4: 1}


class _Heartbeat:
    def __init__(self, now: float) -> None:
        self.last_receive = now
        self.last_reset = now


class _Coordinator:
    def __init__(self, now: float) -> None:
        from kafka.structs import MemberState

        self.state = MemberState.STABLE
        self.heartbeat = _Heartbeat(now)
        self.rejoins = 0

    def request_rejoin(self) -> None:
        self.rejoins += 1


class _Consumer:
    def __init__(self, now: float) -> None:
        self._coordinator = _Coordinator(now)


def test_the_lease_lasts_half_a_session_after_the_last_heartbeat_and_longer_while_rejoining() -> None:
    from kafka.structs import MemberState

    from pipeline.fleet.member import REBALANCE_TIMEOUT, GroupClock

    now = time.monotonic()
    consumer = _Consumer(now - 2.0)
    clock = GroupClock(consumer, session_timeout_s=6.0)
    clock.observe()
    assert clock.overdue_s() == pytest.approx(-1.0, abs=0.1), "3 s allowed, 2 s used"
    consumer._coordinator.heartbeat.last_receive = now - 4.0
    consumer._coordinator.heartbeat.last_reset = now - 4.0
    assert clock.overdue_s() == pytest.approx(1.0, abs=0.1)
    consumer._coordinator.state = MemberState.REBALANCING
    clock.observe()
    assert clock.overdue_s() == pytest.approx(-6.0 * (REBALANCE_TIMEOUT - 0.3), abs=0.1), "a join counts from its start"


def member_with(events: list[str], session_ms: int = 6000) -> Any:
    from prometheus_client import CollectorRegistry

    from pipeline.config import FleetConfig, KafkaConfig
    from pipeline.fleet.member import GroupMember
    from pipeline.ops.health import Heartbeats
    from pipeline.ops.metrics import PipelineMetrics

    return GroupMember(
        KafkaConfig(), FleetConfig(worker_id="w", session_timeout_ms=session_ms),
        Heartbeats(PipelineMetrics(CollectorRegistry())), lambda: {},
        on_assigned=lambda partitions: events.append(f"assigned {sorted(partitions)}"),
        on_revoked=lambda partitions, why: events.append(f"revoked {sorted(partitions)} ({why})"),
        on_members=lambda workers, generation: events.append(f"generation {generation}"))


def test_an_assignment_stops_what_left_it_before_it_starts_what_joined_it() -> None:
    events: list[str] = []
    member = member_with(events)
    member._assignment(frozenset({1, 2}), ["w"], 1)
    member._assignment(frozenset({2, 3}), ["w", "v"], 2)
    assert events == ["generation 1", "assigned [1, 2]", "revoked [1] (rebalance)", "generation 2", "assigned [3]"]
    assert member.owned == {2, 3}


def test_a_lease_that_runs_out_stops_every_stream_and_only_a_new_assignment_ends_the_fence() -> None:
    events: list[str] = []
    member = member_with(events)
    consumer = _Consumer(time.monotonic())
    from pipeline.fleet.member import GroupClock

    clock = member._clock = GroupClock(consumer, 6.0)
    member._assignment(frozenset({4, 5}), ["w"], 1)
    assert member.lease_valid()
    assert not member._check_lease(clock, stalled_s=0.1)
    consumer._coordinator.heartbeat.last_receive = consumer._coordinator.heartbeat.last_reset = time.monotonic() - 3.5
    assert member._check_lease(clock, stalled_s=0.1)
    assert events[-1] == "revoked [4, 5] (fenced)" and member.owned == set()
    consumer._coordinator.heartbeat.last_receive = time.monotonic()  # the heartbeat comes back
    assert not member.lease_valid(), "fenced until the group hands out partitions again"
    member._assignment(frozenset({4}), ["w"], 2)
    assert member.lease_valid() and events[-1] == "assigned [4]"


def test_a_process_that_was_frozen_trusts_nothing_it_heard_before_or_on_waking() -> None:
    events: list[str] = []
    member = member_with(events)
    consumer = _Consumer(time.monotonic())
    from pipeline.fleet.member import GroupClock

    clock = member._clock = GroupClock(consumer, 6.0)
    member._assignment(frozenset({7}), ["w"], 1)
    member._last_turn = time.monotonic() - 10  # frozen for 10 s; its loop has not turned since
    assert not member.lease_valid(), "readers waking up first already see the lease gone"
    member._assignment(frozenset({7, 8}), ["w"], 2)  # an answer that arrived while it slept
    assert member.owned == {7}, "ignored: stale by the time it is heard"
    assert member._check_lease(clock, stalled_s=10.0)
    assert events[-1] == "revoked [7] (fenced)"


def test_back_to_back_rejoins_count_from_the_last_completed_join() -> None:
    from kafka.structs import MemberState

    from pipeline.fleet.member import REBALANCE_TIMEOUT, GroupClock

    now = time.monotonic()
    consumer = _Consumer(now - 20.0)
    consumer._coordinator.state = MemberState.REBALANCING
    clock = GroupClock(consumer, session_timeout_s=6.0)
    clock.observe()
    clock._rebalancing_since = now - 20.0  # a round seen long ago, and the loop missed the stable moment after it
    consumer._coordinator.heartbeat.last_reset = now - 0.1  # the join that just completed
    assert clock.overdue_s() == pytest.approx(0.1 - 6.0 * (REBALANCE_TIMEOUT - 0.3), abs=0.1)
