"""How the group leader hands the registry's partitions to the replicas: by their streams, sticky, in two steps.

- **By streams.** A partition weighs as many streams as the registry holds in it, so three replicas and six
  cameras get two cameras each even when 64 partitions are shared out; empty partitions are spread too, so
  a camera added later lands anywhere. Streams that share a partition move together: give the registry
  many more partitions than the fleet has cameras.
- **Sticky.** Each member reports the partitions it owns; it keeps them unless the balance needs one.
- **Two steps** (Kafka's cooperative protocol). A partition that changes owner is first taken from its
  old owner, which stops its streams; the follow-up rebalance gives it to the new owner. So no camera is
  ever run by two replicas at once, and a rebalance stops only the cameras that move.

Each member's metadata carries its worker id and what it owns; each assignment carries the members' worker
ids, so every replica can say who is in the fleet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from kafka.coordinator.assignors.abstract import AbstractPartitionAssignor, RebalanceProtocol
from kafka.protocol.consumer.metadata import ConsumerProtocolAssignment, ConsumerProtocolSubscription

log = logging.getLogger(__name__)

_MAX_MOVES = 10_000


def balance(partitions: Sequence[int], weights: Mapping[int, int],
            owned: Mapping[str, Collection[int]]) -> dict[str, set[int]]:
    """The target assignment: every partition to one member, streams spread as evenly as partitions allow,
    then empty partitions by count, keeping what each member owns wherever the balance allows."""
    members = sorted(owned)
    assignment: dict[str, set[int]] = {member: set() for member in members}
    if not members:
        return assignment
    existing = set(partitions)
    taken: set[int] = set()
    for member in members:
        for partition in sorted(owned[member]):
            if partition in existing and partition not in taken:
                assignment[member].add(partition)
                taken.add(partition)

    def load(member: str) -> tuple[int, int, str]:
        return sum(weights.get(p, 0) for p in assignment[member]), len(assignment[member]), member

    for partition in sorted(existing - taken, key=lambda p: (-weights.get(p, 0), p)):
        assignment[min(members, key=load)].add(partition)
    for _ in range(_MAX_MOVES):
        heaviest, lightest = max(members, key=load), min(members, key=load)
        gap = load(heaviest)[0] - load(lightest)[0]
        movable = [p for p in assignment[heaviest] if 0 < weights.get(p, 0) < gap]
        if gap <= 1 or not movable:
            break
        partition = min(movable, key=lambda p: (abs(gap - 2 * weights.get(p, 0)), p))
        assignment[heaviest].remove(partition)
        assignment[lightest].add(partition)
    for _ in range(_MAX_MOVES):
        fullest = max(members, key=lambda m: (len(assignment[m]), m))
        emptiest = min(members, key=lambda m: (len(assignment[m]), m))
        empty = sorted(p for p in assignment[fullest] if weights.get(p, 0) == 0)
        if len(assignment[fullest]) - len(assignment[emptiest]) <= 1 or not empty:
            break
        assignment[fullest].remove(empty[-1])
        assignment[emptiest].add(empty[-1])
    return assignment


def first_step(target: Mapping[str, set[int]], owned: Mapping[str, Collection[int]]) -> dict[str, set[int]]:
    """What to hand out now: a partition another live member still owns is held back until it has let go."""
    owner = {partition: member for member, partitions in owned.items() for partition in partitions}
    return {
        member: {p for p in partitions if owner.get(p) in (None, member)}
        for member, partitions in target.items()
    }


@dataclass(frozen=True)
class MemberInfo:
    """What a member says about itself when it joins."""

    worker: str
    owned: frozenset[int]

    def encode(self) -> bytes:
        return orjson.dumps({"worker": self.worker, "owned": sorted(self.owned)})

    @staticmethod
    def decode(user_data: bytes | None) -> MemberInfo:
        try:
            data = orjson.loads(user_data or b"{}")
            return MemberInfo(str(data.get("worker", "")), frozenset(int(p) for p in data.get("owned", ())))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            return MemberInfo("", frozenset())


class StreamAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    """The assignor every replica registers; only the group's leader runs `assign`.

    `weights` gives the streams per partition as this replica's registry view has them; `on_assignment`
    hears this member's whole assignment and the fleet's workers, before kafka-python's listener runs.
    """

    name = "vap-streams"
    version = 0

    def __init__(self, topic: str, worker: str, weights: Callable[[], Mapping[int, int]],
                 on_assignment: Callable[[frozenset[int], list[str], int], None]) -> None:
        self._topic = topic
        self._worker = worker
        self._weights = weights
        self._on_assignment = on_assignment
        self._assigned_this_round = False
        self.owned: frozenset[int] = frozenset()
        self.leading = False
        self.last_target: dict[str, set[int]] = {}

    def supported_protocols(self) -> list[RebalanceProtocol]:
        return [RebalanceProtocol.COOPERATIVE]

    def metadata(self, topics: Collection[str]) -> ConsumerProtocolSubscription:
        return ConsumerProtocolSubscription(self.version, sorted(topics), MemberInfo(self._worker, self.owned).encode())

    def assign(self, cluster: Any, members: Sequence[Any]) -> dict[str, ConsumerProtocolAssignment]:
        infos = {member.member_id: MemberInfo.decode(member.metadata.user_data) for member in members}
        partitions = sorted(cluster.partitions_for_topic(self._topic) or ())
        owned = {member_id: info.owned for member_id, info in infos.items()}
        target = balance(partitions, self._weights(), owned)
        now = first_step(target, owned)
        self.last_target, self._assigned_this_round = target, True
        workers = orjson.dumps(sorted(info.worker for info in infos.values()))
        held_back = sum(len(target[m]) - len(now[m]) for m in target)
        weights = self._weights()
        streams = ", ".join(f"{infos[m].worker or m}: {sum(weights.get(p, 0) for p in target[m])}"
                            for m in sorted(target))
        log.info("fleet: assigned %d partition(s) to %d worker(s), streams %s%s", len(partitions), len(infos), streams,
                 f"; {held_back} partition(s) held back until their owners let go" if held_back else "")
        return {
            member_id: ConsumerProtocolAssignment(self.version, [(self._topic, sorted(now[member_id]))], workers)
            for member_id in infos
        }

    def on_assignment(self, assignment: ConsumerProtocolAssignment, generation: int) -> None:
        self.owned = frozenset(tp.partition for tp in assignment.partitions())
        self.leading, self._assigned_this_round = self._assigned_this_round, False
        try:
            workers = [str(worker) for worker in orjson.loads(assignment.user_data or b"[]")]
        except (orjson.JSONDecodeError, TypeError):
            workers = []
        self._on_assignment(self.owned, workers, generation)

    def lost(self) -> None:
        self.owned = frozenset()
