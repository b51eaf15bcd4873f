"""The interpreter-lock profile (`pipeline.tools.gil_profile`, `benchmarks/gil_profile.py`): py-spy's samples
summed by stage, checked on a real process whose threads are known."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.tools.gil_profile import find_py_spy, record, report, summarize

RAW = "\n".join([
    "thread (101): analytics-0;Thread.run (threading.py:982);AnalyticsStage._work (pipeline/analytics/stage.py:208);"
    "build_message (pipeline/publishing/messages.py:90) 30",
    "thread (102): analytics-1;Thread.run (threading.py:982);AnalyticsStage._work (pipeline/analytics/stage.py:208);"
    "encode (pipeline/publishing/messages.py:120) 10",
    "thread (103): publisher;Thread.run (threading.py:982);KafkaPublisher._turn (pipeline/publishing/publisher.py:180)"
    " 20",
    "thread (104): reader-cam-1;Thread.run (threading.py:982);OpenCvSource.read (pipeline/sources/opencv.py:50) 5",
])


def test_samples_are_summed_by_thread_and_stage_as_shares_of_the_sampled_time() -> None:
    profile = summarize(RAW, seconds=2.0, rate=100)
    assert profile.samples == 65
    assert profile.held == pytest.approx(0.325)
    assert profile.by_stage == pytest.approx({"analytics and messages": 0.2, "publisher": 0.1,
                                              "readers (decode)": 0.025})
    assert list(profile.by_stage) == ["analytics and messages", "publisher", "readers (decode)"]
    assert profile.by_thread["analytics-1"] == pytest.approx(0.05)
    top_stack, share = profile.stacks["analytics and messages"][0]
    assert top_stack == "build_message < AnalyticsStage._work < Thread.run" and share == pytest.approx(0.15)
    assert "analytics and messages" in report(profile, "heading")


_SPINNING_CHILD = textwrap.dedent("""\
    import sys, threading, time

    def spin_building_messages():
        while True:
            sum(range(2000))

    threading.Thread(target=spin_building_messages, name="analytics-0", daemon=True).start()
    print("spinning", flush=True)
    time.sleep(60)
    """)


def test_a_real_process_is_sampled_and_its_busy_thread_found_holding_the_lock(tmp_path: Path) -> None:
    py_spy = find_py_spy()
    assert py_spy is not None, "py-spy is one of the project's dev tools (pyproject.toml)"
    child = subprocess.Popen([sys.executable, "-c", _SPINNING_CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "spinning"
        raw = record(py_spy, child.pid, seconds=2.0, rate=50, raw_path=tmp_path / "profile.raw")
    finally:
        child.kill()
        child.wait()
    profile = summarize(raw, seconds=2.0, rate=50)
    assert profile.by_stage["analytics and messages"] > 0.6, profile.by_stage
    assert set(profile.by_thread) <= {"analytics-0", "MainThread"}
    assert "spin_building_messages" in profile.stacks["analytics and messages"][0][0]
    assert profile.held <= 1.0


def test_a_process_py_spy_cannot_attach_to_is_reported_with_py_spys_words(tmp_path: Path) -> None:
    py_spy = find_py_spy()
    assert py_spy is not None
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with pytest.raises(RuntimeError, match="py-spy failed"):
        record(py_spy, gone.pid, seconds=1.0, rate=10, raw_path=tmp_path / "profile.raw")
