"""vap never calls out of a camera site through its model libraries: no telemetry, no DNS probes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Imports OpenVINO and Ultralytics as the pipeline does, watching the interpreter's audit events for name
# lookups, connections, forks and HTTP requests; with `vap` first, through its own entry point.
_PROBE = """
import json, sys, time
seen = []
watched = {"socket.getaddrinfo", "socket.connect", "os.fork", "urllib.Request"}
sys.addaudithook(lambda event, args: seen.append([event, repr(args)[:200]]) if event in watched else None)
if sys.argv[1] == "vap":
    from pipeline.cli import main
    main(["schema"])
import openvino
import ultralytics.utils
time.sleep(1.0)  # OpenVINO's telemetry sends from a thread pool, right after its import
print("EVENTS " + json.dumps(seen))
"""


def _events(processes: dict[str, subprocess.Popen[str]]) -> dict[str, list[list[str]]]:
    found = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        line = next(line for line in out.splitlines() if line.startswith("EVENTS "))
        found[name] = json.loads(line.removeprefix("EVENTS "))
    return found


# OpenVINO stays quiet where it sees one of these (a CI job); a camera site has none of them.
_CI_MARKERS = {"CI", "TF_BUILD", "JENKINS_URL", "GITHUB_ACTIONS", "PYTEST_CURRENT_TEST"}


def test_model_libraries_make_no_network_calls_or_forks_under_vap(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key not in _CI_MARKERS | {"YOLO_OFFLINE"}}
    processes = {}
    for mode in ("vap", "alone"):
        (tmp_path / mode).mkdir()  # OpenVINO keeps a client id and usage counts in the home directory
        processes[mode] = subprocess.Popen([sys.executable, "-c", _PROBE, mode], text=True,
                                           env={**env, "HOME": str(tmp_path / mode)},
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    found = _events(processes)

    assert "socket.getaddrinfo" in {event for event, _ in found["alone"]}, found  # the probe sees them by themselves
    assert found["vap"] == [], found
    assert (tmp_path / "alone" / "intel").is_dir()
    assert not (tmp_path / "vap" / "intel").exists()
