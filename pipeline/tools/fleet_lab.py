"""A fleet on one machine, for the fleet tests and the failover benchmark: replicas of `vap run` as separate
processes sharing one config, and a watcher that records which replica published each result when.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import yaml

from pipeline.tools.broker import free_port


def partition_of(key: str, partitions: int) -> int:
    """Where Kafka's default partitioner puts a key (what the registry's writers use)."""
    from kafka.partitioner.default import murmur2

    return int(murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def spread_ids(count: int, partitions: int, prefix: str = "cam") -> list[str]:
    """Stream ids that land in distinct registry partitions, so each is a unit of its own."""
    if count > partitions:
        raise ValueError(f"{count} ids cannot land in {partitions} distinct partitions")
    ids: list[str] = []
    used: set[int] = set()
    number = 0
    while len(ids) < count:
        candidate = f"{prefix}-{number:02d}"
        number += 1
        partition = partition_of(candidate, partitions)
        if partition not in used:
            used.add(partition)
            ids.append(candidate)
    return ids


@dataclass
class Publication:
    stream_id: str
    worker: str
    frame_id: int
    captured_at: float  # wall clock, seconds
    received: float  # monotonic


@dataclass
class ResultWatcher:
    """Reads the results topic from its start on a thread; every message with its `worker` header."""

    bootstrap: str
    topic: str
    seen: list[Publication] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._read, name="fleet-lab-watcher", daemon=True)

    def start(self) -> ResultWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _read(self) -> None:
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(self.topic, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest",
                                 enable_auto_commit=False, metadata_max_age_ms=1000)
        try:
            while not self._stop.is_set():
                for records in consumer.poll(timeout_ms=100).values():
                    now = time.monotonic()
                    with self._lock:
                        for record in records:
                            headers = dict(record.headers or [])
                            message = orjson.loads(record.value)
                            captured = datetime.fromisoformat(message["captured_at"]).timestamp()
                            self.seen.append(Publication(message["stream_id"], headers.get("worker", b"").decode(),
                                                         int(message["frame_id"]), captured, now))
        finally:
            consumer.close()

    def since(self, moment: float) -> list[Publication]:
        with self._lock:
            return [item for item in self.seen if item.received >= moment]

    def owners_since(self, moment: float) -> dict[str, set[str]]:
        owners: dict[str, set[str]] = {}
        for item in self.since(moment):
            owners.setdefault(item.stream_id, set()).add(item.worker)
        return owners

    def first_from(self, worker_other_than: str, stream_ids: set[str], moment: float) -> dict[str, float]:
        """For each stream, when a replica other than the given one first published it after `moment`."""
        first: dict[str, float] = {}
        for item in self.since(moment):
            if item.stream_id in stream_ids and item.worker != worker_other_than and item.stream_id not in first:
                first[item.stream_id] = item.received
        return first

    def by(self, worker: str) -> list[Publication]:
        with self._lock:
            return [item for item in self.seen if item.worker == worker]

    def settled(self, stream_ids: set[str], workers: set[str], window_s: float = 2.0) -> bool:
        """Over the last `window_s`, every stream came from exactly one replica, and every replica ran one."""
        owners = self.owners_since(time.monotonic() - window_s)
        return (set(owners) == stream_ids and all(len(found) == 1 for found in owners.values())
                and set().union(*owners.values()) == workers)

    def wait(self, condition: Callable[[], bool], timeout_s: float, what: str) -> float:
        """Seconds until `condition` held; raises TimeoutError naming `what`."""
        started = time.monotonic()
        while not condition():
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"{what} within {timeout_s:.0f} s")
            time.sleep(0.05)
        return time.monotonic() - started


class FleetLab:
    """Replicas of one config, each `vap run` with its own worker id and HTTP port."""

    def __init__(self, workdir: Path, bootstrap: str, clip: Path, weights: str, streams: int = 6,
                 session_timeout_ms: int = 6000, partitions: int = 16, fps: float | None = None) -> None:
        self.workdir = workdir
        self.bootstrap = bootstrap
        suffix = str(time.monotonic_ns())
        self.topic = f"fleet-results-{suffix}"
        self.partitions = partitions
        self.stream_ids = spread_ids(streams, partitions)
        self.config_path = workdir / "fleet.yaml"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}
        tree: dict[str, Any] = {
            "streams": [{"id": stream_id, "url": str(clip), "loop": True, "realtime": True,
                         **({} if fps is None else {"fps": fps})} for stream_id in self.stream_ids],
            "model": {"weights": weights, "imgsz": 160, "warmup": False},
            "batching": {"max_batch": 4, "max_wait_ms": 10},
            "kafka": {"bootstrap_servers": bootstrap, "topic": self.topic, "linger_ms": 0, "client_process": False},
            "tracking": {"events_topic": f"fleet-events-{suffix}"},
            "http": {"host": "127.0.0.1"},
            "fleet": {"group": f"fleet-{suffix}", "streams_topic": f"fleet-streams-{suffix}",
                      "partitions": partitions, "session_timeout_ms": session_timeout_ms},
        }
        self.config_path.write_text(yaml.safe_dump(tree), encoding="utf-8")

    def start(self, worker: str) -> subprocess.Popen[bytes]:
        port = free_port()
        log = (self.workdir / f"{worker}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "-c", str(self.config_path), "--set", f"fleet.worker_id={worker}",
             "--set", f"http.port={port}"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.processes[worker], self.ports[worker] = process, port
        return process

    def signal(self, worker: str, sig: signal.Signals) -> None:
        self.processes[worker].send_signal(sig)

    def fleet(self, worker: str) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[worker]}/api/v1/fleet", timeout=2) as response:
                info: dict[str, Any] = orjson.loads(response.read())
                return info
        except OSError:
            return None

    def request(self, worker: str, method: str, path: str, body: dict[str, Any] | None = None) -> int:
        data = None if body is None else orjson.dumps(body)
        request = urllib.request.Request(f"http://127.0.0.1:{self.ports[worker]}{path}", data=data, method=method,
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    def log(self, worker: str) -> str:
        return (self.workdir / f"{worker}.log").read_text(errors="replace")

    def owner_of(self, worker: str) -> list[str]:
        """The streams `worker` says it runs (empty when it does not answer)."""
        info = self.fleet(worker)
        return [] if info is None else list(info["streams"])

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)
                    process.kill()
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
