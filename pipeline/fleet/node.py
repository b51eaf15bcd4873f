"""Fleet mode for one replica: the registry says which streams exist, the group says which partitions this
replica owns, and this node runs exactly the registry's streams in those partitions.

Stops happen at once, on the thread that learns of them (a revocation must finish before this replica
rejoins the group); starts happen on the node's own thread, which also retries what could not start.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from pipeline.config import FleetConfig, KafkaConfig, StreamConfig
from pipeline.errors import NotAcceptingChanges, RegistryUnavailable, StreamExists, UnknownStream
from pipeline.fleet.assignor import balance
from pipeline.fleet.member import GroupMember
from pipeline.fleet.registry import RegistryChange, RegistryClient, RegistryEntry
from pipeline.ops.health import Heartbeats
from pipeline.threads import StageThread

log = logging.getLogger(__name__)

_RETRY_S = 5.0
_CATCH_UP_S = 10.0
_REBALANCE_AFTER_S = 2.0


class LocalStreams(Protocol):
    """The pipeline as the fleet drives it: the streams this process runs."""

    def run_stream(self, stream: StreamConfig) -> None: ...

    def stop_streams(self, stream_ids: Iterable[str], wait_s: float) -> None: ...

    def local_streams(self) -> Mapping[str, StreamConfig]: ...


class FleetMetrics:
    def __init__(self, registry: CollectorRegistry, worker: str) -> None:
        self.streams = Gauge("vap_fleet_streams", "Streams this replica runs for the fleet", ["worker"],
                             registry=registry).labels(worker=worker)
        self.rebalances = Counter("vap_fleet_rebalances_total", "Assignments this replica received from the group",
                                  registry=registry)
        self.invalid_records = Counter("vap_fleet_registry_invalid_total",
                                       "Registry records skipped because they are not a stream config",
                                       registry=registry)
        self.fenced = Counter("vap_fleet_fenced_total",
                              "Times this replica stopped its streams because its group lease ran out",
                              registry=registry)


class FleetNode:
    def __init__(self, kafka: KafkaConfig, fleet: FleetConfig, local: LocalStreams, registry: CollectorRegistry,
                 heartbeats: Heartbeats, config_path: Path | None = None) -> None:
        self.config = fleet
        self._local = local
        self._source = str(config_path) if config_path is not None else ""
        self._kafka = kafka
        self._file_streams: list[StreamConfig] = []
        self._connected = threading.Event()
        self.metrics = FleetMetrics(registry, fleet.worker_id)
        self.registry = RegistryClient(kafka, fleet, heartbeats, self._registry_changed, self._invalid_record)
        self.member = GroupMember(kafka, fleet, heartbeats, self.registry.streams_per_partition, self._assigned,
                                  self._revoked, self._members)
        self._apply_lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = StageThread("fleet-node", self._run, heartbeats)
        self._workers: list[str] = []
        self._generation = -1
        self._failed: dict[str, tuple[RegistryEntry, str]] = {}
        self._running: set[str] = set()

    def start(self, file_streams: list[StreamConfig]) -> None:
        """Joins the fleet, or, while Kafka cannot be reached, keeps trying on the node's thread: a replica
        that starts before its broker (a site powering up) joins once the broker is there."""
        self._file_streams = file_streams
        self._connect()
        self._thread.start()

    def _connect(self) -> bool:
        try:
            self.registry.start()
        except Exception as error:
            log.warning("fleet: cannot reach Kafka at %s for the stream registry (%s); trying again",
                        self._kafka.bootstrap_servers, error)
            return False
        if not self.registry.wait_caught_up(_CATCH_UP_S):
            log.warning("fleet: the stream registry was not read to its end in %.0f s; going on", _CATCH_UP_S)
        try:
            self.sync_file_streams(self._file_streams)
        except RegistryUnavailable as error:
            log.warning("fleet: %s; trying again", error)
            return False
        self.member.start()
        self._connected.set()
        log.info("fleet: worker %s joining group %s (registry %s)", self.config.worker_id, self.config.group,
                 self.config.streams_topic)
        return True

    def sync_file_streams(self, streams: list[StreamConfig]) -> None:
        """The file's streams into the registry; file streams no longer in the file out of it. The last write
        wins; a warning names both writers when two files disagree."""
        entries = self.registry.entries()
        for stream in streams:
            existing = entries.get(stream.id)
            if existing is not None and existing.stream == stream and existing.origin == "file":
                continue
            if existing is not None and existing.stream != stream:
                log.warning("fleet: stream %s is defined differently by %s and by %s; the last write wins (this "
                            "one)", stream.id, _writer(existing), _writer_of(self.config.worker_id, self._source))
            self.registry.write(stream, "file", self._source)
        in_file = {stream.id for stream in streams}
        for stream_id, entry in entries.items():
            if entry.origin == "file" and stream_id not in in_file:
                log.info("fleet: stream %s left the config file; removing it from the registry", stream_id)
                self.registry.remove(stream_id)

    def add(self, stream: StreamConfig) -> None:
        """The control API's add: into the registry, from where its owner starts it."""
        if stream.id in self.registry.entries():
            raise StreamExists(stream.id)
        self.registry.write(stream, "api")

    def remove(self, stream_id: str) -> None:
        if stream_id not in self.registry.entries():
            raise UnknownStream(stream_id)
        self.registry.remove(stream_id)

    def leave(self) -> None:
        """Starts leaving the group, without waiting: the others take this replica's streams over while its
        pipeline drains what it has read."""
        self._stop.set()
        self._wake.set()
        self.member.leave()
        self.registry.leave()

    def stop(self, timeout_s: float = 1.0) -> None:
        """Leaves (if `leave` was not called) and waits, within `timeout_s` for all of it."""
        self.leave()
        deadline = time.monotonic() + timeout_s
        self.member.join(timeout_s)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self.registry.join(max(0.0, deadline - time.monotonic()))

    def info(self) -> dict[str, Any]:
        if not self._connected.is_set():
            state = "starting" if not self._thread.is_alive() else "waiting for Kafka"
            return {"worker_id": self.config.worker_id, "group": self.config.group, "state": state}
        entries = self.registry.entries()
        owned = self.member.owned
        return {
            "worker_id": self.config.worker_id,
            "group": self.config.group,
            "state": "joining" if self._generation < 0 else "cut off" if self.member.lease_overdue_s > 0 else "member",
            "registry_topic": self.config.streams_topic,
            "generation": self._generation,
            "members": list(self._workers),
            "partitions": sorted(owned),
            "streams": sorted(self._running),
            "not_started": {stream_id: reason for stream_id, (_, reason) in sorted(self._failed.items())},
            "registry_streams": len(entries),
            "lease_left_s": round(-self.member.lease_overdue_s, 3),
        }

    def _registry_changed(self, changes: list[RegistryChange]) -> None:
        with self._apply_lock:
            owned = self.member.owned
            moved_away = [change.stream_id for change in changes if change.stream_id in self._running and (
                change.entry is None or change.entry.partition not in owned)]
            self._stop_local(moved_away, "it left the registry")
        self._wake.set()

    def _unbalanced(self) -> bool:
        target = self.member.assignor.last_target
        partitions = sorted({p for owned in target.values() for p in owned})
        return bool(target) and balance(partitions, self.registry.streams_per_partition(), target) != target

    def _invalid_record(self, _key: str, _problem: str) -> None:
        self.metrics.invalid_records.inc()

    def _assigned(self, _partitions: frozenset[int]) -> None:
        self._wake.set()

    def _members(self, workers: list[str], generation: int) -> None:
        self._workers, self._generation = workers, generation
        self.metrics.rebalances.inc()

    def _revoked(self, partitions: frozenset[int], why: str) -> None:
        with self._apply_lock:
            entries = self.registry.entries()
            stopping = [stream_id for stream_id in self._running
                        if stream_id not in entries or entries[stream_id].partition in partitions]
            if why == "fenced":
                self.metrics.fenced.inc()
            self._stop_local(stopping, f"its partition was revoked ({why})")

    def _stop_local(self, stream_ids: list[str], why: str) -> None:
        if not stream_ids:
            return
        for stream_id in stream_ids:
            log.info("fleet: stopping stream %s: %s", stream_id, why, extra={"stream": stream_id})
        with contextlib.suppress(NotAcceptingChanges):  # the pipeline is stopping all of them anyway
            self._local.stop_streams(stream_ids, wait_s=1.0)
        self._running.difference_update(stream_ids)
        self.metrics.streams.set(len(self._running))

    def _run(self) -> None:
        backoff_s = 1.0
        while not self._connected.is_set():
            self._thread.beat(busy_for_s=backoff_s + 15)  # a try waits on Kafka's own timeouts
            if self._stop.wait(backoff_s) or self._connect():
                break
            backoff_s = min(backoff_s * 2, 30.0)
        unbalanced_since: float | None = None
        while not self._stop.is_set():
            self._thread.beat()
            self._wake.wait(_RETRY_S if unbalanced_since is None else _REBALANCE_AFTER_S / 4)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._reconcile()
            unbalanced_since = self._rebalance_if_still_unbalanced(unbalanced_since)

    def _rebalance_if_still_unbalanced(self, since: float | None) -> float | None:
        """The leader asks for a rebalance when registry changes have left the streams unevenly spread for a
        while: a stream added and removed again at once is not worth moving cameras for."""
        if not (self.member.assignor.leading and self._unbalanced()):
            return None
        now = time.monotonic()
        if since is None:
            return now
        if now - since < _REBALANCE_AFTER_S:
            return since
        log.info("fleet: the registry's changes left the streams unevenly spread; asking for a rebalance")
        self.member.request_rebalance()
        return None

    def _reconcile(self) -> None:
        """Runs what this replica owns and nothing else; a stream whose config changed is restarted."""
        with self._apply_lock:
            owned = self.member.owned
            wanted = {stream_id: entry for stream_id, entry in self.registry.entries().items()
                      if entry.partition in owned}
            local = self._local.local_streams()
            changed = [stream_id for stream_id in self._running
                       if stream_id not in wanted or local.get(stream_id) != wanted[stream_id].stream]
            self._stop_local(changed, "its config changed or it is no longer this replica's")
            for stream_id, entry in wanted.items():
                if stream_id in self._running or self._failed.get(stream_id, (None,))[0] == entry:
                    continue
                self._start_local(entry)
            self._failed = {key: value for key, value in self._failed.items() if key in wanted}
            self.metrics.streams.set(len(self._running))

    def _start_local(self, entry: RegistryEntry) -> None:
        stream = entry.stream
        try:
            self._local.run_stream(stream)
        except NotAcceptingChanges:
            return
        except StreamExists:
            log.warning("fleet: stream %s already runs here outside the fleet", stream.id)
            return
        except ValueError as error:
            log.error("fleet: cannot start stream %s on this replica: %s", stream.id, error)
            self._failed[stream.id] = (entry, str(error))
            return
        self._failed.pop(stream.id, None)
        self._running.add(stream.id)
        log.info("fleet: started stream %s (partition %d)", stream.id, entry.partition, extra={"stream": stream.id})


def _writer(entry: RegistryEntry) -> str:
    return _writer_of(entry.writer, entry.source) if entry.origin == "file" else f"the API (via {entry.writer})"


def _writer_of(worker: str, source: str) -> str:
    return f"{source or 'a config file'} on {worker or 'an unknown worker'}"
