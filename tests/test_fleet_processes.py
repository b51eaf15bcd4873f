"""Fleet mode as it runs at a site: three `vap run` processes of one config, six cameras looping in real time,
a real broker. Replicas are killed, frozen, restarted and drained; the results topic says who published what.

One scenario, so the three model loads are paid once. The seconds it prints are measurements, and the
bounds are what an operator is promised: the session timeout (6 s here), a rebalance, a stream's start.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.tools.broker import EmbeddedBroker
from pipeline.tools.fleet_lab import FleetLab, ResultWatcher, partition_of, spread_ids
from tests.conftest import write_moving_box_clip
from tests.servers.fixtures import MjpegServerFactory

WORKERS = ("a", "b", "c")
TAKEOVER_BOUND_S = 30.0  # 6 s session + a rebalance (3-4 s here, some rounds up to 12 s) + a stream's start
START_BOUND_S = 120.0  # three model loads at once on two cores


@pytest.fixture
def lab(tmp_path: Path, broker: EmbeddedBroker, model_weights: str) -> Iterator[tuple[FleetLab, ResultWatcher]]:
    clip = write_moving_box_clip(tmp_path / "camera.mp4", 320, 192, frames=50, fps=5.0)
    fleet = FleetLab(tmp_path, broker.bootstrap_servers, clip, model_weights, streams=6, session_timeout_ms=6000)
    watcher = ResultWatcher(broker.bootstrap_servers, fleet.topic).start()
    try:
        yield fleet, watcher
    finally:
        fleet.stop_all()
        watcher.stop()
        for worker in fleet.processes:
            print(f"--- {worker}.log (tail)\n" + "\n".join(fleet.log(worker).splitlines()[-15:]))


def streams_of(watcher: ResultWatcher, worker: str) -> set[str]:
    return {stream for stream, owners in watcher.owners_since(time.monotonic() - 2).items() if owners == {worker}}


def wait_for_stable_fleet(fleet: FleetLab, timeout_s: float = 60.0) -> dict[str, list[int]]:
    """Each replica's partitions, once every replica is a member of one generation that holds for 2 s (a
    rebalance after a join takes two rounds, and the assignment moves between them)."""
    deadline = time.monotonic() + timeout_s
    previous: tuple[int, ...] | None = None
    while time.monotonic() < deadline:
        infos = {worker: fleet.fleet(worker) for worker in WORKERS}
        if all(info is not None and info.get("state") == "member" for info in infos.values()):
            generations = tuple(int(info["generation"]) for info in infos.values() if info is not None)
            if len(set(generations)) == 1 and generations == previous:
                return {worker: list(info["partitions"]) for worker, info in infos.items() if info is not None}
            previous = generations
        time.sleep(2)
    raise TimeoutError(f"the fleet did not hold one generation for 2 s within {timeout_s:.0f} s")


def take_over(watcher: ResultWatcher, lost: set[str], gone: str, since: float) -> float:
    return watcher.wait(lambda: set(watcher.first_from(gone, lost, since)) == lost, TAKEOVER_BOUND_S,
                        f"the others did not publish {sorted(lost)} after {gone} went")


@pytest.mark.timeout(600)  # three model loads, two restarts, and every takeover waits out a session
def test_replicas_share_the_cameras_take_over_from_dead_and_hung_ones_and_hand_over_on_sigterm(
        lab: tuple[FleetLab, ResultWatcher], mjpeg_server_factory: MjpegServerFactory) -> None:
    fleet, watcher = lab
    network_camera = mjpeg_server_factory(clip=fleet.workdir / "camera.mp4", fps=5.0)  # the API adds only these
    cameras = set(fleet.stream_ids)
    for worker in WORKERS:
        fleet.start(worker)
    watcher.wait(lambda: watcher.settled(cameras, set(WORKERS)), START_BOUND_S,
                 "three replicas did not settle with each camera on exactly one")

    killed = "a"
    lost = streams_of(watcher, killed)
    killed_at = time.monotonic()
    fleet.signal(killed, signal.SIGKILL)
    took = take_over(watcher, lost, killed, killed_at)
    print(f"SIGKILL: {sorted(lost)} published by the others {took:.1f} s after the kill")

    fleet.start(killed)
    watcher.wait(lambda: watcher.settled(cameras, set(WORKERS)), START_BOUND_S,
                 "the restarted replica did not get its share back")

    hung = "b"
    lost = streams_of(watcher, hung)
    frozen_at, frozen_wall = time.monotonic(), time.time()
    fleet.signal(hung, signal.SIGSTOP)
    took = take_over(watcher, lost, hung, frozen_at)
    print(f"SIGSTOP: {sorted(lost)} published by the others {took:.1f} s after the freeze")
    resumed_at = time.monotonic()
    fleet.signal(hung, signal.SIGCONT)
    time.sleep(3)  # the resumed replica reads and publishes at once if it is going to
    late = [item for item in watcher.by(hung) if item.received > resumed_at and item.stream_id in lost]
    newly_read = [item for item in late if item.captured_at > frozen_wall]
    last = max((item.received for item in late), default=resumed_at)
    print(f"SIGCONT: the hung replica published {len(late)} frame(s) of its lost streams, all read before the "
          f"freeze, the last {last - resumed_at:.2f} s after it resumed")
    assert not newly_read, f"after resuming, the hung replica read and published {len(newly_read)} new frame(s)"
    assert len(late) <= 20 * len(lost), "more than the frames a replica holds in flight"
    watcher.wait(lambda: watcher.settled(cameras, set(WORKERS)), 60, "the resumed replica did not get its share back")

    owner, other = "c", "a"
    partitions = wait_for_stable_fleet(fleet)[owner]
    added = next(candidate for candidate in spread_ids(fleet.partitions, fleet.partitions, prefix="added")
                 if partition_of(candidate, fleet.partitions) in partitions)
    asked = time.monotonic()
    assert fleet.request(other, "POST", "/api/v1/streams", {"id": added, "url": network_camera.url}) == 201
    started = watcher.wait(lambda: any(item.stream_id == added for item in watcher.since(asked)), 5,
                           f"{added}, added through {other}, was not published by its owner {owner}")
    assert {item.worker for item in watcher.since(asked) if item.stream_id == added} == {owner}
    print(f"API: {added} added through {other}, published by {owner} {started:.2f} s later")
    assert fleet.request(other, "DELETE", f"/api/v1/streams/{added}") == 204
    removed_at = time.monotonic()
    time.sleep(4)
    after = [item for item in watcher.since(removed_at + 3) if item.stream_id == added]
    assert not after, f"{added} was still published 3 s after its removal"

    drained = "c"
    watcher.wait(lambda: watcher.settled(cameras, set(WORKERS)), 60, "the fleet did not settle before the drain")
    lost = streams_of(watcher, drained)
    drained_at = time.monotonic()
    fleet.signal(drained, signal.SIGTERM)
    assert fleet.processes[drained].wait(timeout=15) == 0
    took = take_over(watcher, lost, drained, drained_at)
    print(f"SIGTERM: {sorted(lost)} published by the others {took:.1f} s after the signal")
    summary = re.search(r"stopped: (\d+) frame\(s\) read, (\d+) published, (\d+) dropped", fleet.log(drained))
    assert summary is not None, fleet.log(drained)[-2000:]
    read, published, dropped = map(int, summary.groups())
    assert read == published + dropped, "the drained replica lost frames uncounted"
    watcher.wait(lambda: len(watcher.by(drained)) == published, 10,
                 f"Kafka did not hold the {published} results the drained replica counted as published")
    moved = [item for item in watcher.since(drained_at) if item.stream_id in lost and item.worker != drained]
    assert min(item.frame_id for item in moved) < 5, "a moved stream starts its frame ids again"
