"""This replica's membership in the fleet's consumer group: which registry partitions it owns, and a lease
that ends its ownership on its own when it can no longer show the group it is alive.

The group coordinator gives a dead member's partitions away once `session_timeout_ms` passes without its
heartbeat. A replica that is cut off (a partition of the network, a frozen process, a broker that lost it)
does not hear that it has lost them, so it ends its lease itself, well before another replica can be given
them:
- half a session without a heartbeat answered, while it is a stable member;
- the rebalance timeout (less a margin) while it rejoins, since the coordinator keeps a joining member that
  long and joins can take seconds;
- 0.4 of a session without its own loop turning: a process that was frozen (SIGSTOP, a paused VM) cannot
  trust anything it heard before, and its readers wake up with it.
From then on its readers pass no frame on (`lease_lost`) and its streams stop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.config import FleetConfig, KafkaConfig
from pipeline.fleet.assignor import StreamAssignor
from pipeline.ops.health import Heartbeats
from pipeline.publishing.kafka_client import kafka_client_settings
from pipeline.threads import StageThread

log = logging.getLogger(__name__)

_POLL_MS = 100
REBALANCE_TIMEOUT = 1.5  # in sessions


class GroupClock:
    """How long this member has gone without showing the coordinator it is alive.

    kafka-python keeps this in its coordinator (no public API): the last heartbeat answered and the last
    completed join. While this member rejoins, heartbeats pause and the coordinator keeps it for the
    rebalance timeout (`REBALANCE_TIMEOUT` sessions), counted from when the rebalance began, which this
    member learns of up to one heartbeat interval (a tenth of a session) late. Joins on some brokers take
    several seconds (a delay to gather members), so a join may use most of that before the lease ends.
    """

    def __init__(self, consumer: Any, session_timeout_s: float) -> None:
        self._coordinator = consumer._coordinator
        self._session_s = session_timeout_s
        self._rebalancing_since: float | None = None

    def observe(self) -> None:
        """Notes when a rejoin began; called often (each turn of the member's loop)."""
        from kafka.structs import MemberState

        if self._coordinator.state != MemberState.REBALANCING:
            self._rebalancing_since = None
        elif self._rebalancing_since is None:
            self._rebalancing_since = time.monotonic()

    def overdue_s(self) -> float:
        """How far past its allowance the lease is (> 0: stop the streams now). Safe from any thread."""
        now = time.monotonic()
        heartbeat = self._coordinator.heartbeat
        rebalancing_since = self._rebalancing_since
        if rebalancing_since is not None:  # a join that completed since counts too (rounds come back to back)
            since = max(rebalancing_since, float(heartbeat.last_reset))
            return now - since - self._session_s * (REBALANCE_TIMEOUT - 0.3)
        return now - float(max(heartbeat.last_receive, heartbeat.last_reset)) - self._session_s * 0.5

    def describe(self) -> str:
        heartbeat, now = self._coordinator.heartbeat, time.monotonic()
        return (f"state {self._coordinator.state}, last heartbeat answered {now - heartbeat.last_receive:.1f} s ago, "
                f"last join {now - heartbeat.last_reset:.1f} s ago")

    def request_rejoin(self) -> None:
        self._coordinator.request_rejoin()


class GroupMember:
    """Joins the group on a named thread and tells its owner what it owns, in order:

    - `on_revoked(partitions, why)` runs before this member may rejoin, so the streams stop before any other
      replica is given them; it also runs when the lease runs out (`fenced`), when membership is lost and
      when this replica leaves.
    - `on_assigned(partitions)` runs when partitions are added.
    - `on_members(workers, generation)` after each assignment.
    They run on kafka-python's I/O thread or this member's thread; keep them short.
    """

    def __init__(self, kafka: KafkaConfig, fleet: FleetConfig, heartbeats: Heartbeats,
                 weights: Callable[[], Mapping[int, int]], on_assigned: Callable[[frozenset[int]], None],
                 on_revoked: Callable[[frozenset[int], str], None],
                 on_members: Callable[[list[str], int], None]) -> None:
        self._kafka = kafka
        self._fleet = fleet
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked
        self._on_members = on_members
        self.assignor = StreamAssignor(fleet.streams_topic, fleet.worker_id, weights, self._assignment)
        self._lock = threading.Lock()
        self._owned: frozenset[int] = frozenset()
        self._stop = threading.Event()
        self._rejoin = threading.Event()
        self._thread = StageThread("fleet-member", self._run, heartbeats)
        self.lease_overdue_s = 0.0
        self._clock: GroupClock | None = None
        self._stall_limit_s = fleet.session_timeout_ms / 1000 * 0.4
        self._last_turn = time.monotonic()
        self._fenced = False  # the lease ran out; only a new assignment gives this replica streams again

    @property
    def owned(self) -> frozenset[int]:
        with self._lock:
            return self._owned

    def start(self) -> None:
        self._thread.start()

    def request_rebalance(self) -> None:
        """Ask for a new assignment (the leader does, when the registry changed the balance)."""
        self._rejoin.set()

    def leave(self) -> None:
        """Leaves the group (on the member's thread), so the others take this replica's partitions at once,
        not after its session."""
        self._stop.set()

    def join(self, timeout_s: float) -> bool:
        return self._thread.join(timeout_s)

    def _run(self) -> None:
        from kafka import ConsumerRebalanceListener, KafkaConsumer

        member = self

        class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            """The assignor's `on_assignment` has already applied the assignment; these catch the rest."""

            def on_partitions_revoked(self, revoked: Any) -> None:
                member._revoke(frozenset(tp.partition for tp in revoked), "rebalance")

            def on_partitions_lost(self, lost: Any) -> None:
                member._revoke(frozenset(tp.partition for tp in lost), "membership lost")

            def on_partitions_assigned(self, assigned: Any) -> None:
                pass

        session_ms = self._fleet.session_timeout_ms
        settings = {
            **kafka_client_settings(self._kafka),
            "request_timeout_ms": max(self._kafka.request_timeout_ms, int(session_ms * REBALANCE_TIMEOUT) + 5000),
            "client_id": f"{self._kafka.client_id}-fleet-{self._fleet.worker_id}",
        }
        consumer = KafkaConsumer(
            **settings, group_id=self._fleet.group, enable_auto_commit=False,
            partition_assignment_strategy=[self.assignor], session_timeout_ms=session_ms,
            heartbeat_interval_ms=max(100, session_ms // 10),
            max_poll_interval_ms=int(session_ms * REBALANCE_TIMEOUT),
        )
        clock = self._clock = GroupClock(consumer, session_ms / 1000)
        try:
            consumer.subscribe([self._fleet.streams_topic], listener=Listener())
            while not self._stop.is_set():
                self._thread.beat()
                stalled_s = time.monotonic() - self._last_turn
                if stalled_s > self._stall_limit_s:
                    self._fenced = True  # before the turn is noted: readers must not see a fresh lease
                    self._rejoin.set()  # and what the group says from here on comes from a new join
                self._last_turn = time.monotonic()
                consumer.poll(timeout_ms=_POLL_MS, max_records=1, update_offsets=False)
                if self._check_lease(clock, stalled_s):
                    self._rejoin.set()  # the coordinator may still count this member: ask for partitions again
                if self._rejoin.is_set():
                    self._rejoin.clear()
                    clock.request_rejoin()
        finally:
            self._revoke(self.owned, "leaving the group")
            consumer.close(autocommit=False)

    def lease_valid(self) -> bool:
        """Whether this replica may still hand on frames of its streams: false from the moment the lease runs
        out, even before the member's loop has stopped them (a process that was frozen wakes up with its
        readers, and they must not publish new frames of cameras another replica runs by now)."""
        clock = self._clock
        stalled = time.monotonic() - self._last_turn > self._stall_limit_s
        return clock is not None and not stalled and not self._fenced and clock.overdue_s() <= 0

    def _check_lease(self, clock: GroupClock, stalled_s: float) -> bool:
        """Whether the lease ran out just now (and this replica's streams were stopped).

        A loop that did not turn for a good part of a session means the process was frozen (a stopped
        process, a paused VM) or starved: what kafka-python last heard from the group says nothing about
        now, and another replica may run these cameras already."""
        clock.observe()
        self.lease_overdue_s = clock.overdue_s()
        stalled = stalled_s > self._stall_limit_s
        if not self.owned or (self.lease_overdue_s <= 0 and not stalled):
            return False
        self._fenced = True
        why = f"this process stalled for {stalled_s:.1f} s" if stalled else clock.describe()
        log.warning("fleet: this replica's group lease ran out (%s); stopping its streams before the group can "
                    "give them to another", why)
        self._revoke(self.owned, "fenced")
        return True

    def _assignment(self, partitions: frozenset[int], workers: list[str], generation: int) -> None:
        """The whole assignment of a generation: what left it stops first, then what joined it starts."""
        if time.monotonic() - self._last_turn > self._stall_limit_s:
            return  # heard on waking from a freeze, before this member's loop has seen it: stale by now
        self._fenced = False
        with self._lock:
            added, revoked = partitions - self._owned, self._owned - partitions
        if revoked:
            self._revoke(revoked, "rebalance")
        with self._lock:
            self._owned = self._owned | added
        self._on_members(workers, generation)
        if added:
            self._on_assigned(added)

    def _revoke(self, revoked: frozenset[int], why: str) -> None:
        with self._lock:
            revoked = revoked & self._owned
            self._owned = self._owned - revoked
        if why != "rebalance":
            self.assignor.lost()
        if revoked:
            self._on_revoked(revoked, why)
