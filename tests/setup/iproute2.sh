#!/usr/bin/env bash
# `ip` from Debian's iproute2, for the tests that put a client in a network namespace of its
# own (tests/netns.py: the admin endpoints seen from a non-loopback address). Installed with
# apt-get when missing and this runs as root. Idempotent: does nothing when `ip` is on PATH.
# Otherwise it says why and exits 0: those tests then skip with the reason (and fail under
# CI=true). Creating a namespace needs root in any case.
set -euo pipefail

if command -v ip >/dev/null; then
    exit 0
fi
. "$(dirname "$0")/apt.sh"
apt_install prereq-iproute2 "the network-namespace tests" iproute2 || exit 0
command -v ip >/dev/null
