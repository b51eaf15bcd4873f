"""Who holds the interpreter's lock: py-spy's samples of a running vap, summed by stage.

vap's host work (readers, batching, post-processing, messages, publishing) shares one interpreter. When
that interpreter is what limits a GPU host, the question is which stage holds its lock, and for what.
`py-spy record --gil` records only the thread holding the lock at each sample, so the samples of each
thread, divided by the samples taken, are the share of the time it held the lock. The stages are those of
the bench's CPU account (`pipeline.tools.cpu_account.role_of`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.tools.cpu_account import role_of

_STACK_DEPTH = 3  # the innermost frames that name what a thread was doing


@dataclass
class GilProfile:
    """`held`: the share of the sampled time that some thread held the lock; `by_stage` and `by_thread`: each
    one's share of that same time; `stacks`: per stage, its innermost frames and their share."""

    seconds: float
    rate: int
    samples: int
    held: float
    by_stage: dict[str, float]
    by_thread: dict[str, float]
    stacks: dict[str, list[tuple[str, float]]] = field(default_factory=dict)


def summarize(raw: str, seconds: float, rate: int, top: int = 8) -> GilProfile:
    """Sums py-spy's raw output (`-f raw --threads`: one line per distinct stack, `thread (TID): NAME;frame;...
    COUNT`) by thread and stage."""
    expected = max(1.0, seconds * rate)
    by_thread: Counter[str] = Counter()
    by_stage: Counter[str] = Counter()
    stacks: dict[str, Counter[str]] = {}
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        thread, *frames = stack.split(";")
        name = thread.partition(": ")[2] or thread
        stage = role_of(name)
        samples += count
        by_thread[name] += count
        by_stage[stage] += count
        innermost = " < ".join(frame.split(" (")[0] for frame in reversed(frames[-_STACK_DEPTH:]))
        stacks.setdefault(stage, Counter())[innermost] += count
    return GilProfile(
        seconds=seconds, rate=rate, samples=samples, held=min(1.0, samples / expected),
        by_stage={stage: count / expected for stage, count in by_stage.most_common()},
        by_thread={name: count / expected for name, count in by_thread.most_common()},
        stacks={stage: [(stack, count / expected) for stack, count in found.most_common(top)]
                for stage, found in stacks.items()})


def find_py_spy(given: str | None = None) -> str | None:
    """py-spy from `given`, the PATH, or beside this interpreter (a virtual environment's bin, or the bin of
    a `pip install --target` directory on sys.path)."""
    candidates: list[str | None] = [given, shutil.which("py-spy"), str(Path(sys.executable).parent / "py-spy")]
    candidates += [str(Path(entry) / "bin" / "py-spy") for entry in sys.path if entry]
    return next((path for path in candidates if path and os.access(path, os.X_OK)), None)


def record(py_spy: str, pid: int, seconds: float, rate: int, raw_path: Path) -> str:
    """Samples `pid` (this process, typically) for `seconds`; returns py-spy's raw output. Raises
    RuntimeError with py-spy's own words when it cannot attach (no ptrace permission in a container, say)."""
    command = [py_spy, "record", "--pid", str(pid), "--gil", "--threads", "--rate", str(rate),
               "--duration", str(max(1, round(seconds))), "--format", "raw", "--output", str(raw_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0 or not raw_path.exists():
        raise RuntimeError(f"py-spy failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}")
    return raw_path.read_text(encoding="utf-8", errors="replace")


def report(profile: GilProfile, heading: str) -> str:
    lines = [heading, f"the lock was held {profile.held:.0%} of the {profile.seconds:.0f} s sampled "
                      f"({profile.samples} samples at {profile.rate}/s)", "",
             f"{'stage':<34} {'held (share of the time)':>24}"]
    lines += [f"{stage:<34} {share:>24.1%}" for stage, share in profile.by_stage.items()]
    lines += ["", f"{'thread':<34} {'held':>24}"]
    lines += [f"{name:<34} {share:>24.1%}" for name, share in list(profile.by_thread.items())[:20]]
    for stage, found in profile.stacks.items():
        lines += ["", f"{stage}: innermost frames"]
        lines += [f"  {share:6.1%}  {stack}" for stack, share in found]
    return "\n".join(lines) + "\n"
