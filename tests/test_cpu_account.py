"""The bench's CPU account: each stage's threads and the helper processes, by the names the pipeline gives."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest

from pipeline.tools.cpu_account import BENCH, KAFKA_PROCESS, NATIVE, POLYGON_PROCESSES, cpu_by_role, role_of

_BURN_S = 0.25


def _burn(seconds: float) -> None:
    """CPU time, not wall time: a busy loop until this thread has used `seconds` of it. The thread then lives
    for two samples more: what an ended thread used after its last sample is not counted."""
    started = time.thread_time()
    while time.thread_time() - started < seconds:
        pass
    time.sleep(0.55)


@dataclass
class _Pipeline:
    """What the account reads from a pipeline: its helper processes."""

    helper_pids: dict[str, list[int]] = field(default_factory=dict)


def test_stage_names_map_to_stages() -> None:
    assert role_of("reader-cam-1") == "readers (decode)"
    assert role_of("finish-cuda:1") == "NMS, masks, polygons"
    assert role_of("kafka-pipe-out") == role_of("publisher") == "publisher"
    assert role_of("MainThread") == BENCH
    assert role_of("something-else") == "other threads"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread CPU times come from /proc")
def test_cpu_is_counted_by_stage_including_a_thread_that_ended_and_the_helper_processes() -> None:
    """The helpers burn only once the account has started, so their interpreters' start is not counted (under a
    loaded machine it was a third of what they burn), and say when they are done."""
    script = ("import sys, time\nprint('ready', flush=True)\nsys.stdin.readline()\nt = time.process_time()\n"
              f"while time.process_time() - t < {_BURN_S}: pass\nprint('done', flush=True)\ntime.sleep(30)")
    kafka, polygons = helpers = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for helper in helpers:
            assert helper.stdout is not None and helper.stdout.readline() == "ready\n"
        pipeline = _Pipeline({KAFKA_PROCESS: [kafka.pid], POLYGON_PROCESSES: [polygons.pid]})
        with cpu_by_role(pipeline) as account:  # type: ignore[arg-type]
            for helper in helpers:
                assert helper.stdin is not None
                helper.stdin.write("go\n")
                helper.stdin.flush()
            threads = [threading.Thread(target=_burn, args=(_BURN_S,), name=name)
                       for name in ("reader-cam", "finish-cpu")]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for helper in helpers:
                assert helper.stdout is not None and helper.stdout.readline() == "done\n"
            time.sleep(0.55)  # two samples more, as for the threads
            account.sample()
            spent = account.seconds_by_role()
    finally:
        for helper in helpers:
            helper.kill()
            helper.communicate()

    for role in ("readers (decode)", "NMS, masks, polygons", KAFKA_PROCESS, POLYGON_PROCESSES):
        assert spent[role] == pytest.approx(_BURN_S, abs=0.08), spent
    assert spent.get(NATIVE, 0.0) < 0.1, spent


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's /proc/stat")
def test_stolen_time_is_a_share_of_the_machines_cpu_time() -> None:
    from pipeline.tools.cpu_account import StolenTime

    stolen = StolenTime()
    started = time.process_time()
    while time.process_time() - started < 0.05:
        pass
    fraction = stolen.fraction()
    assert fraction is not None and 0.0 <= fraction <= 1.0
