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
. "$(dirname "$0")/apt.sh"
apt_install prereq-chromium "the browser tests" chromium fonts-dejavu-core || exit 0
command -v chromium >/dev/null
