#!/usr/bin/env bash
# Installs the Debian packages the integration tests need: GStreamer's RTSP server and codecs for the
# system Python (the stream-server fixtures), Prometheus with promtool (the scrape test and the
# alert-rule check), and Chromium with its WebDriver (the dashboard's browser tests). Idempotent: when everything is present it only runs one dpkg-query.
# Never fails the build: without apt (or without the rights to use it) it warns and exits 0, and
# the RTSP tests then skip with a reason that names this script.
set -u

PACKAGES=(
  gir1.2-gst-rtsp-server-1.0
  python3-gi
  gstreamer1.0-plugins-base
  gstreamer1.0-plugins-good
  gstreamer1.0-plugins-bad
  gstreamer1.0-plugins-ugly
  gstreamer1.0-libav
  gstreamer1.0-tools
  prometheus
  chromium
  chromium-driver
)

warn() {
  echo "install-system-deps: WARNING: $*" >&2
  echo "install-system-deps: the RTSP stream, Prometheus and dashboard browser tests will be skipped." >&2
}

missing_packages() {
  local status
  status=$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${PACKAGES[@]}" 2>/dev/null)
  for package in "${PACKAGES[@]}"; do
    if ! grep -qx "$package installed" <<<"$status"; then
      echo "$package"
    fi
  done
}

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  warn "apt-get/dpkg not found (not a Debian-based system); install GStreamer's RTSP server and" \
       "python3-gi for /usr/bin/python3 by other means: ${PACKAGES[*]}"
  exit 0
fi

mapfile -t MISSING < <(missing_packages)
if [ "${#MISSING[@]}" -eq 0 ]; then
  exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    warn "not root and no password-less sudo; missing packages: ${MISSING[*]}" \
         "(run: sudo apt-get install ${MISSING[*]})"
    exit 0
  fi
fi

export DEBIAN_FRONTEND=noninteractive
APT_INSTALL=(${SUDO[@]+"${SUDO[@]}"} apt-get install -y --no-install-recommends "${MISSING[@]}")

echo "install-system-deps: installing ${MISSING[*]}"
if ! "${APT_INSTALL[@]}"; then
  echo "install-system-deps: install failed; running apt-get update and retrying"
  if ! ${SUDO[@]+"${SUDO[@]}"} apt-get update -q || ! "${APT_INSTALL[@]}"; then
    warn "apt-get could not install: ${MISSING[*]}"
    exit 0
  fi
fi

mapfile -t STILL_MISSING < <(missing_packages)
if [ "${#STILL_MISSING[@]}" -ne 0 ]; then
  warn "still missing after install: ${STILL_MISSING[*]}"
fi
exit 0
