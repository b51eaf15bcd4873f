"""Two vap configurations compared in interleaved pairs, on the same generated clips, in one process.

    python benchmarks/interleaved_ab.py --pairs 4 --set kafka.client_process=false

On a GPU host, `benchmarks/gpu_sweep.sh ab OUT_DIR` runs it on 16 streams of 1080p H.264 decoded by NVDEC.

A shared machine drifts by 10-20% between runs of `vap bench`, far more than most changes are worth.
Runs of A (the bench's configuration) and B (the same with each `--set` applied) alternate, ABBA, so
a drift hits both alike; the script prints each run and the mean and median of B/A over the pairs.
This is how the Kafka client's child process was measured (`benchmarks/README.md`, runs H-J).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.tools.bench import (
    CEILING_PASSES,
    ReplayDetector,
    add_clip_arguments,
    clip_options,
    decode_all,
    looping,
    machine_facts,
    make_clips,
    progress,
    run_vap,
    vap_config,
    with_overrides,
)
from pipeline.tools.broker import EmbeddedBroker
from pipeline.tools.demo import SHIPPED_WEIGHTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", required=True, metavar="KEY.PATH=VALUE",
                        help="what B changes; repeat for several keys")
    parser.add_argument("--both", dest="shared", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="what A and B both change from the bench's configuration; repeat for several keys")
    parser.add_argument("--pairs", type=int, default=4)
    add_clip_arguments(parser, frames=300)
    parser.add_argument("--instant", action="store_true",
                        help="both run the bench's instant model (its host ceiling), for changes to the host side")
    parser.add_argument("--json", type=Path, help="also write every run's measurement to this file")
    args = parser.parse_args()
    options, device = clip_options(args)
    fps: dict[str, list[float]] = {"A": [], "B": []}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vap-ab-") as scratch, EmbeddedBroker() as broker:
        progress(f"generating {options.streams} clips of {options.frames} frames ({args.size})")
        clips = make_clips(Path(scratch), options, fps=10.0, prefix="ab")
        instant: dict[str, Any] = {}
        if args.instant:
            replay = ReplayDetector.sampled(options, str(SHIPPED_WEIGHTS), device, decode_all(clips, limit=60))
            instant = {"detector_factory": lambda _config, _device: replay,
                       "until_frames": CEILING_PASSES * options.streams * options.frames}
        for pair in range(args.pairs):
            for variant in ("AB" if pair % 2 == 0 else "BA"):
                config = vap_config(options, str(SHIPPED_WEIGHTS), clips, broker.bootstrap_servers,
                                    f"ab.{pair}.{variant}", realtime=False, device=device)
                if args.instant:
                    config = looping(config)
                config = with_overrides(config, args.shared)
                if variant == "B":
                    config = with_overrides(config, args.overrides)
                measured = run_vap(config, variant, device, timeout_s=600, **instant)
                fps[variant].append(measured.fps)
                runs.append({"pair": pair + 1, "variant": variant, **asdict(measured), "fps": measured.fps})
                cpu = measured.cpu_ms_per_frame or {}
                print(f"pair {pair + 1} {variant}: {measured.fps:7.1f} frames/s, "
                      f"p99 {measured.latency_p99_ms or 0:.0f} ms, {measured.cpu_cores or 0:.2f} CPU cores; "
                      "CPU ms per frame: "
                      + ", ".join(f"{role} {ms:.2f}" for role, ms in cpu.items() if ms >= 0.005), flush=True)
    ratios = [b / a for a, b in zip(fps["A"], fps["B"], strict=True)]
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_facts(device), "options": asdict(options) | {
            "json_path": str(args.json)}, "both_sets": args.shared, "b_sets": args.overrides, "runs": runs,
            "b_over_a": ratios}, indent=2))
    shared = "".join(f", {assignment}" for assignment in args.shared)
    print(f"A (bench config{shared}): mean {statistics.mean(fps['A']):.1f} frames/s")
    print(f"B ({', '.join(args.overrides)}): mean {statistics.mean(fps['B']):.1f} frames/s")
    print(f"B/A per pair: {' '.join(f'{ratio:.3f}' for ratio in ratios)}; mean {statistics.mean(ratios):.3f}, "
          f"median {statistics.median(ratios):.3f}, B ahead in {sum(ratio > 1 for ratio in ratios)} of {len(ratios)}")


if __name__ == "__main__":
    main()
