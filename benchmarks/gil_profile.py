"""Which of vap's stages holds the interpreter's lock, and doing what, while vap runs flat out.

    python benchmarks/gil_profile.py --instant --seconds 10 --out /tmp/gil

On a GPU host, `benchmarks/gpu_sweep.sh gil OUT_DIR` runs it on 16 streams of 1080p H.264 decoded by NVDEC.

vap reads the bench's generated clips in a loop, as fast as it can (`--instant`: with the bench's instant
model, so the host side alone is the limit), publishing to an embedded broker. Once `--warm-up` seconds have
passed, py-spy samples this process for `--seconds` with `--gil` (`pipeline.tools.gil_profile`). The script
writes OUT/gil-profile.txt (also printed), OUT/gil-profile.json and py-spy's raw stacks (OUT/gil-profile.raw,
input for flamegraph.pl), with the frames/s before and while sampling: py-spy pauses the process at each
sample, and the difference shows what that cost.

py-spy comes from PyPI (`pip install py-spy`, in the project's dev tools and in the GPU wheelhouse). It needs
permission to trace the process, which some containers withhold; the script then says so and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.app import Pipeline
from pipeline.tools.bench import (
    ReplayDetector,
    add_clip_arguments,
    clip_options,
    decode_all,
    delivered_messages,
    looping,
    machine_facts,
    make_clips,
    progress,
    vap_config,
    with_overrides,
)
from pipeline.tools.broker import EmbeddedBroker
from pipeline.tools.demo import SHIPPED_WEIGHTS
from pipeline.tools.gil_profile import find_py_spy, record, report, summarize


def frames_per_second(pipeline: Pipeline, seconds: float) -> float:
    before, started = delivered_messages(pipeline), time.monotonic()
    time.sleep(seconds)
    return (delivered_messages(pipeline) - before) / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=10.0, help="sampled")
    parser.add_argument("--warm-up", type=float, default=10.0, help="seconds of running before sampling")
    parser.add_argument("--rate", type=int, default=100, help="samples a second")
    parser.add_argument("--instant", action="store_true", help="the bench's instant model instead of the real one")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    add_clip_arguments(parser, frames=150)  # the clips loop
    parser.add_argument("--py-spy", help="the py-spy executable (default: found on PATH or beside Python)")
    args = parser.parse_args()
    py_spy = find_py_spy(args.py_spy)
    if py_spy is None:
        sys.exit("py-spy not found: pip install py-spy, or give --py-spy PATH")
    options, device = clip_options(args)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vap-gil-") as scratch, EmbeddedBroker() as broker:
        progress(f"generating {options.streams} clips of {options.frames} frames ({args.size}, {options.codec})")
        clips = make_clips(Path(scratch), options, fps=30.0, prefix="gil")
        factory: Any = None
        if args.instant:
            replay = ReplayDetector.sampled(options, str(SHIPPED_WEIGHTS), device, decode_all(clips, limit=60))
            factory = lambda _config, _device: replay  # noqa: E731
        config = looping(vap_config(options, str(SHIPPED_WEIGHTS), clips, broker.bootstrap_servers, "gil.profile",
                                    realtime=False, device=device))
        pipeline = Pipeline(with_overrides(config, args.overrides), detector_factory=factory)
        try:
            progress("starting vap")
            pipeline.start()
            progress(f"warming up for {args.warm_up:.0f} s")
            fps_before = frames_per_second(pipeline, args.warm_up)
            progress(f"sampling with py-spy for {args.seconds:.0f} s at {args.rate}/s ({fps_before:.0f} frames/s)")
            delivered, started = delivered_messages(pipeline), time.monotonic()
            try:
                raw = record(py_spy, os.getpid(), args.seconds, args.rate, args.out / "gil-profile.raw")
            except RuntimeError as error:
                sys.exit(str(error))
            fps_during = (delivered_messages(pipeline) - delivered) / (time.monotonic() - started)
        finally:
            pipeline.stop()
    profile = summarize(raw, args.seconds, args.rate)
    heading = (f"vap{' with the instant model' if args.instant else ''}: {options.streams} "
               f"{'tracked ' if options.tracking else ''}streams of {args.size} "
               f"{options.codec}, decoder {options.decoder}, batch {options.batch}, {device}"
               f"{', ' + ' '.join(args.overrides) if args.overrides else ''}; {fps_before:.0f} frames/s before "
               f"sampling, {fps_during:.0f} while sampled")
    text = report(profile, heading)
    (args.out / "gil-profile.txt").write_text(text, encoding="utf-8")
    (args.out / "gil-profile.json").write_text(json.dumps({
        "machine": machine_facts(device), "options": asdict(options), "instant": args.instant,
        "sets": args.overrides, "fps_before": fps_before, "fps_while_sampled": fps_during,
        "profile": asdict(profile)}, indent=2), encoding="utf-8")
    print(text, end="")


if __name__ == "__main__":
    main()
