#!/bin/sh
# The whole GPU measurement in one command, for a GPU host with Python, CUDA PyTorch, NumPy and OpenCV but
# no internet. On a connected machine first:
#
#   benchmarks/wheelhouse.sh .wheels 3.12 --split      # .wheels/1 and .wheels/2, each under 50 MB
#
# then copy the repository with .wheels to the host and there, from the repository's root:
#
#   benchmarks/gpu_sweep.sh install .wheels/1          # into .vapsite/ (both parts, or one at a time)
#   benchmarks/gpu_sweep.sh install .wheels/2
#   benchmarks/gpu_sweep.sh check OUT_DIR              # first: are the GPU path's detections right? (1-2 min)
#   benchmarks/gpu_sweep.sh run OUT_DIR                # about 8 minutes on an H100
#   benchmarks/gpu_sweep.sh ab OUT_DIR                 # vap alone, without and with AB_SET, interleaved
#   benchmarks/gpu_sweep.sh gil OUT_DIR                # which stage holds the interpreter's lock (about 1 min)
#
# `run` writes OUT_DIR/results-<gpu>-<date>.json and OUT_DIR/results-<gpu>-<date>.txt: the bench's usual
# contenders on 16 streams of 1080p H.264 decoded by NVDEC, then 16, 32 and 64 cameras at 30 frames/s each.
# SWEEP=none leaves the camera sweep out and QUICK=1 shortens the rest (`vap bench --quick`), for a run that
# must fit a shorter window. DECODING_PROCESSES=4 decodes in 4 worker processes (decoding.processes), and
# POLYGON_PROCESSES=4 traces mask outlines in 4 (model.polygon_processes), MESSAGE_PROCESSES=4 builds messages
# in 4 (analytics.message_processes), INFERENCE_PROCESS=1 runs the model in a process of its own
# (model.inference_process): run once with 0 and once with them to choose the defaults for GPU hosts,
# or let `ab` compare them in one call: it runs vap end to end on the same clips and settings, A as configured
# and B with each of AB_SET's KEY=VALUE (space separated; default model.polygon_processes=4
# analytics.message_processes=4; AB_BOTH's apply to both), in AB-BA order for AB_PAIRS pairs (default 2), and
# writes OUT_DIR/results-<gpu>-<date>-ab.json and .txt. The model in a process of its own, for instance:
#   AB_BOTH="analytics.message_processes=4" AB_SET=model.inference_process=true   (NVDEC frames by CUDA IPC) `gil` runs vap end to end on the same settings (plus GIL_SET's
# KEY=VALUE; the clips loop, so 120 frames each by default) and has py-spy sample it for GIL_SECONDS (10) after
# GIL_WARM_UP (15): the share of the time each stage holds the interpreter's lock, and doing what, in
# OUT_DIR/gil-<gpu>-<date>/ (py-spy from the wheelhouse, or PY_SPY); GIL_TRACKING=1 tracks every stream, with a
# zone and a line (then GIL_SET=analytics.processes=4 runs their analytics in 4 workers). Settings can be overridden for a dry run on
# a CPU, e.g.
#   VAP_PYTHON=.venv/bin/python DEVICE=cpu DECODER=cpu SIZE=320x192 FRAMES=30 STREAMS=2 BATCH=4 IMGSZ=160 \
#     SWEEP=2,4 SWEEP_FPS=5 SWEEP_SECONDS=2 benchmarks/gpu_sweep.sh run /tmp/out
set -eu

usage() {
    echo "usage: $0 install WHEEL_DIR | check OUT_DIR | run OUT_DIR | ab OUT_DIR | gil OUT_DIR" >&2
    exit 2
}

[ "$#" -eq 2 ] || usage
site=${VAP_SITE:-.vapsite}
python=${VAP_PYTHON:-python3}

case "$1" in
install)
    mkdir -p "$site"
    "$python" -m pip install --disable-pip-version-check -q --no-index --no-deps --upgrade --target "$site" "$2"/*.whl
    echo "gpu_sweep.sh: installed $(find "$2" -name '*.whl' | wc -l) wheels into $site"
    ;;
run)
    out=$2
    mkdir -p "$out"
    gpu=$("$python" -c 'import torch; print(torch.cuda.get_device_name(0).split()[1].lower() if torch.cuda.is_available() else "cpu")')
    stem="$out/results-$gpu-$(date +%Y-%m-%d)"
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
        nproc
    } > "$stem.machine.txt"
    sweep=${SWEEP:-16,32,64}
    if [ "$sweep" = none ]; then set --; else set -- --sweep "$sweep"; fi
    if [ -n "${QUICK:-}" ]; then set -- "$@" --quick; fi
    PYTHONPATH="$site:.${PYTHONPATH:+:$PYTHONPATH}" "$python" -m pipeline bench \
        --device "${DEVICE:-cuda:0}" --decoder "${DECODER:-cuda:0}" --codec "${CODEC:-h264}" \
        --streams "${STREAMS:-16}" --size "${SIZE:-1920x1080}" --frames "${FRAMES:-240}" \
        --batch "${BATCH:-32}" --imgsz "${IMGSZ:-640}" "$@" \
        --sweep-fps "${SWEEP_FPS:-30}" --sweep-seconds "${SWEEP_SECONDS:-15}" \
        --decoding-processes "${DECODING_PROCESSES:-0}" --polygon-processes "${POLYGON_PROCESSES:-0}" \
        --message-processes "${MESSAGE_PROCESSES:-0}" ${INFERENCE_PROCESS:+--inference-process} \
        --json "$stem.json" > "$stem.txt"
    cat "$stem.txt"
    ;;
check)
    out=$2
    mkdir -p "$out"
    PYTHONPATH="$site:.${PYTHONPATH:+:$PYTHONPATH}" "$python" benchmarks/gpu_check.py --device "${DEVICE:-cuda:0}" \
        --json "$out/gpu-check-$(date +%Y-%m-%d).json"
    ;;
ab)
    out=$2
    mkdir -p "$out"
    gpu=$("$python" -c 'import torch; print(torch.cuda.get_device_name(0).split()[1].lower() if torch.cuda.is_available() else "cpu")')
    stem="$out/results-$gpu-$(date +%Y-%m-%d)-ab"
    set --
    for assignment in ${AB_SET:-model.polygon_processes=4 analytics.message_processes=4}; do set -- "$@" --set "$assignment"; done
    for assignment in ${AB_BOTH:-}; do set -- "$@" --both "$assignment"; done
    PYTHONPATH="$site:.${PYTHONPATH:+:$PYTHONPATH}" "$python" benchmarks/interleaved_ab.py "$@" \
        --pairs "${AB_PAIRS:-2}" --device "${DEVICE:-cuda:0}" --decoder "${DECODER:-cuda:0}" --codec "${CODEC:-h264}" \
        --streams "${STREAMS:-16}" --size "${SIZE:-1920x1080}" --frames "${FRAMES:-240}" \
        --batch "${BATCH:-32}" --imgsz "${IMGSZ:-640}" --json "$stem.json" > "$stem.txt"
    cat "$stem.txt"
    ;;
gil)
    out=$2
    mkdir -p "$out"
    gpu=$("$python" -c 'import torch; print(torch.cuda.get_device_name(0).split()[1].lower() if torch.cuda.is_available() else "cpu")')
    set --
    for assignment in ${GIL_SET:-}; do set -- "$@" --set "$assignment"; done
    if [ -n "${GIL_TRACKING:-}" ]; then set -- "$@" --tracking; fi
    PYTHONPATH="$site:.${PYTHONPATH:+:$PYTHONPATH}" "$python" benchmarks/gil_profile.py "$@" \
        --py-spy "${PY_SPY:-$site/bin/py-spy}" --seconds "${GIL_SECONDS:-10}" --warm-up "${GIL_WARM_UP:-15}" \
        --device "${DEVICE:-cuda:0}" --decoder "${DECODER:-cuda:0}" --codec "${CODEC:-h264}" \
        --streams "${STREAMS:-16}" --size "${SIZE:-1920x1080}" --frames "${FRAMES:-120}" \
        --batch "${BATCH:-32}" --imgsz "${IMGSZ:-640}" --out "$out/gil-$gpu-$(date +%Y-%m-%d)"
    ;;
*)
    usage
    ;;
esac
