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
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "prereq-iproute2: no ip on PATH and cannot install it (needs root with apt-get);" \
         "the network-namespace tests will skip" >&2
    exit 0
fi
echo "prereq-iproute2: installing Debian's iproute2"
export DEBIAN_FRONTEND=noninteractive
# other jobs on the machine may hold apt's lock: wait for it rather than fail
apt_get() { apt-get -o DPkg::Lock::Timeout=600 "$@"; }
apt_get install -y -qq --no-install-recommends iproute2 >/dev/null \
    || { apt_get update -qq && apt_get install -y -qq --no-install-recommends iproute2 >/dev/null; }
command -v ip >/dev/null
