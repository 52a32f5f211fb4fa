#!/usr/bin/env bash
# Test prerequisite `make prereq-bullseye`: .cache/bullseye, a minimal Debian 11 root
# (glibc 2.31) that tests/test_portable.py runs the binary in. Made once (about a minute
# with apt's cache of .deb files warm), then kept. Without root it says why and makes
# nothing: those tests then skip (and fail under CI=true).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" != 0 ]; then
    echo "prereq-bullseye: not root, so no Debian 11 root (debootstrap): its tests skip" >&2
    exit 0
fi
exec packaging/debian-root.sh .cache/bullseye
