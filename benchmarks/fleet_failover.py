"""Fleet mode's failover, measured: replicas of `vap run` on one machine, a real broker, cameras looping in
real time, and the results topic as the witness of who published what when.

    python benchmarks/fleet_failover.py --runs 5 --json benchmarks/results-fleet.json

Three numbers, each over `--runs` rounds (`benchmarks/README.md`, fleet):
- failover: from SIGKILL of a replica to the first frame of each of its cameras published by another;
- join: from a restarted replica asking to join (`GET /api/v1/fleet` says `joining`) to its first
  assignment, and to its first frame published;
- hang: a replica frozen with SIGSTOP until the others run its cameras, then resumed: how many frames
  of those cameras it still publishes, how long after resuming, and whether any was read after the freeze.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.tools.bench import BenchOptions, machine_facts, make_clips, progress
from pipeline.tools.broker import EmbeddedBroker
from pipeline.tools.demo import SHIPPED_WEIGHTS
from pipeline.tools.fleet_lab import FleetLab, ResultWatcher

WORKERS = ("a", "b", "c")


def streams_of(watcher: ResultWatcher, worker: str) -> set[str]:
    return {stream for stream, owners in watcher.owners_since(time.monotonic() - 2).items() if owners == {worker}}


def settle(lab: FleetLab, watcher: ResultWatcher, timeout_s: float = 180) -> float:
    return watcher.wait(lambda: watcher.settled(set(lab.stream_ids), set(WORKERS)), timeout_s,
                        "the replicas did not settle with every camera on exactly one")


def take_over(watcher: ResultWatcher, lost: set[str], gone: str, since: float) -> list[float]:
    watcher.wait(lambda: set(watcher.first_from(gone, lost, since)) == lost, 60,
                 f"the others did not take over {sorted(lost)}")
    return sorted(moment - since for moment in watcher.first_from(gone, lost, since).values())


def kill_round(lab: FleetLab, watcher: ResultWatcher, victim: str) -> dict[str, Any]:
    lost = streams_of(watcher, victim)
    killed_at = time.monotonic()
    lab.signal(victim, signal.SIGKILL)
    lab.processes[victim].wait(10)
    failover = take_over(watcher, lost, victim, killed_at)
    lab.start(victim)
    joining_at: float | None = None
    while True:
        info = lab.fleet(victim)
        now = time.monotonic()
        if info is not None and info.get("state") == "joining" and joining_at is None:
            joining_at = now
        if info is not None and info.get("state") == "member" and joining_at is not None:
            assigned_at = now
            break
        time.sleep(0.02)
    first = watcher.wait(lambda: any(item.received > assigned_at for item in watcher.by(victim)), 60,
                         f"{victim} published nothing after it rejoined")
    settle(lab, watcher)
    return {"victim": victim, "cameras": sorted(lost), "failover_s": [round(s, 2) for s in failover],
            "join_to_assignment_s": round(assigned_at - joining_at, 2),
            "join_to_first_frame_s": round(assigned_at - joining_at + first, 2)}


def hang_round(lab: FleetLab, watcher: ResultWatcher, victim: str) -> dict[str, Any]:
    lost = streams_of(watcher, victim)
    frozen_at, frozen_wall = time.monotonic(), time.time()
    lab.signal(victim, signal.SIGSTOP)
    takeover = take_over(watcher, lost, victim, frozen_at)
    resumed_at = time.monotonic()
    lab.signal(victim, signal.SIGCONT)
    time.sleep(8)
    late = [item for item in watcher.by(victim) if item.received > resumed_at and item.stream_id in lost]
    settle(lab, watcher)
    return {"victim": victim, "cameras": sorted(lost), "takeover_s": [round(s, 2) for s in takeover],
            "published_after_resume": len(late),
            "read_after_freeze": sum(item.captured_at > frozen_wall for item in late),
            "last_after_resume_s": round(max((item.received for item in late), default=resumed_at) - resumed_at, 2)}


def summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "worst": round(max(values), 2),
            "best": round(min(values), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--streams", type=int, default=6)
    parser.add_argument("--session-timeout-ms", type=int, default=6000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, EmbeddedBroker() as broker:
        workdir = Path(scratch)
        [clip] = make_clips(workdir, BenchOptions(streams=1, frames=50, width=320, height=192), 5.0, "camera")
        lab = FleetLab(workdir, broker.bootstrap_servers, clip, str(SHIPPED_WEIGHTS), streams=args.streams,
                       session_timeout_ms=args.session_timeout_ms)
        watcher = ResultWatcher(broker.bootstrap_servers, lab.topic).start()
        try:
            for worker in WORKERS:
                lab.start(worker)
            progress(f"3 replicas, {args.streams} cameras: settled after {settle(lab, watcher):.1f} s")
            kills, hangs = [], []
            for run in range(args.runs):
                kills.append(kill_round(lab, watcher, WORKERS[run % len(WORKERS)]))
                progress(f"kill {run + 1}/{args.runs}: {kills[-1]}")
            for run in range(args.runs):
                hangs.append(hang_round(lab, watcher, WORKERS[run % len(WORKERS)]))
                progress(f"hang {run + 1}/{args.runs}: {hangs[-1]}")
        finally:
            lab.stop_all()
            watcher.stop()
    report = {
        "machine": machine_facts("cpu"), "replicas": len(WORKERS), "cameras": args.streams,
        "session_timeout_ms": args.session_timeout_ms, "kills": kills, "hangs": hangs,
        "failover_s": summary([max(run["failover_s"]) for run in kills]),
        "join_to_assignment_s": summary([run["join_to_assignment_s"] for run in kills]),
        "join_to_first_frame_s": summary([run["join_to_first_frame_s"] for run in kills]),
        "hang_takeover_s": summary([max(run["takeover_s"]) for run in hangs]),
        "hang_published_after_resume": max(run["published_after_resume"] for run in hangs),
        "hang_read_after_freeze": sum(run["read_after_freeze"] for run in hangs),
    }
    print(json.dumps({key: value for key, value in report.items() if key not in ("kills", "hangs", "machine")},
                     indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
