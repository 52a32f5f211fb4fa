#!/usr/bin/env bash
# A headless Chromium for the status page's browser tests (tests/test_status_browser.py):
# Debian's `chromium` package, installed with apt-get when missing and this runs as root.
# Idempotent: does nothing when a chromium binary is on PATH. Otherwise, when it cannot
# install, it says why and exits 0: the browser tests then skip with that reason (and fail
# under CI=true).
set -euo pipefail

for name in chromium chromium-browser; do
    if command -v "$name" >/dev/null; then
        exit 0
    fi
done
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "prereq-chromium: no chromium on PATH and cannot install it (needs root with apt-get);" \
         "the browser tests will skip" >&2
    exit 0
fi
echo "prereq-chromium: installing Debian's chromium"
export DEBIAN_FRONTEND=noninteractive
# other jobs on the machine may hold apt's lock: wait for it rather than fail
apt_get() { apt-get -o DPkg::Lock::Timeout=600 "$@"; }
apt_get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null \
    || { apt_get update -qq && apt_get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; }
command -v chromium >/dev/null
