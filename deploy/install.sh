#!/bin/sh
# The project's one install command. `make` (development: EXTRAS=dev), both Dockerfiles and the bare-metal
# guide in docs/deploy.md (runtime: no extras) all run this script, so every environment installs the
# same way, from the same constraints file.
#
#   deploy/install.sh VENV [EXTRAS]
#
# Creates the virtual environment VENV when it has no pip yet (with $PYTHON, default python3), then
# installs the project editable with its pinned constraints. VENV is relative to the repository root.
# Standard pip variables (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_NO_INDEX, PIP_FIND_LINKS) choose where
# packages come from; VAP_EXTRA_REQUIREMENTS names extra packages to install alongside (for example
# TensorRT in the CUDA image), space-separated.
set -eu

if [ "$#" -lt 1 ] || [ "$#" -gt 2 ]; then
    echo "usage: $0 VENV [EXTRAS]" >&2
    exit 2
fi
venv=$1
extras=${2:-}

case $0 in */*) here=${0%/*} ;; *) here=. ;; esac
cd "$here/.."
python=${PYTHON:-python3}

# A venv without pip is what a failed `python3 -m venv` leaves behind on Debian; start it again.
make_venv() {
    rm -rf "$venv"
    "$python" -m venv "$venv" && return 0
    rm -rf "$venv"
    # Debian and Ubuntu ship venv's pip bootstrap apart from python3, in python3-venv.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "install.sh: '$python -m venv' failed; installing Debian's python3-venv" >&2
        if apt-get update -qq && apt-get install -y -qq python3-venv && "$python" -m venv "$venv"; then
            return 0
        fi
        rm -rf "$venv"
    fi
    echo "install.sh: '$python -m venv $venv' failed; on Debian or Ubuntu install python3-venv" \
        "(apt-get install python3-venv), then run this again" >&2
    return 1
}
[ -x "$venv/bin/pip" ] || make_venv || exit 1

target=.
[ -z "$extras" ] || target=".[$extras]"

# Word splitting of VAP_EXTRA_REQUIREMENTS is intended; globbing is not.
set -f
# shellcheck disable=SC2086
exec "$venv/bin/pip" install --disable-pip-version-check -q -c constraints.txt -e "$target" ${VAP_EXTRA_REQUIREMENTS:-}
