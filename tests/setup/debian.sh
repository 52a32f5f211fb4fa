#!/usr/bin/env bash
# Installs the Debian packages that provide missing commands, when this runs as root with
# apt-get; otherwise says what is missing and leaves it (the tests needing it skip, naming it;
# under CI=true they fail).
#
#   tests/setup/debian.sh COMMAND:PACKAGE...     e.g. readelf:binutils systemd-analyze:systemd
set -euo pipefail

missing=()
for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} (Debian)"
    export DEBIAN_FRONTEND=noninteractive
    # other jobs on the machine may hold apt's lock: wait for it rather than fail
    apt_get() { apt-get -o DPkg::Lock::Timeout=600 "$@"; }
    apt_get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || { apt_get update -qq && apt_get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
else
    echo "warning: ${missing[*]} missing and not installable here (needs root and apt-get)" >&2
    exit 1
fi
