#!/usr/bin/env bash
# Installs the Debian packages that provide missing commands (tests/setup/apt.sh: as root with
# apt-get); otherwise says which tests will skip and exits 1 (under CI=true they fail).
#
#   tests/setup/debian.sh PREREQ TESTS COMMAND:PACKAGE...
#   e.g. tests/setup/debian.sh prereq-systemd "the unit tests" systemd-analyze:systemd
set -euo pipefail
prereq=$1 tests=$2
shift 2

missing=()
for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
. "$(dirname "$0")/apt.sh"
apt_install "$prereq" "$tests" "${missing[@]}"
