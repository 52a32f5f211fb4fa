#!/usr/bin/env bash
# `make prereq-binary`: dist/kvcm and dist/kvcm-onedir/ for the frozen-binary tests
# (tests/test_binary.py, tests/test_systemd_units.py, tests/test_portable.py), built by
# `make binary ONEDIR=1` (in the Debian 11 build root, as root) only when what goes into them
# changed: a hash of kvcm/, the files of packaging/ (not its sub-directories: dashboards),
# setup.py and pyproject.toml, kept in .cache/binary.stamp. The build and the tests need
# binutils (installed when missing, as root).
set -euo pipefail
cd "$(dirname "$0")/../.."

inputs_hash() {
    { { find kvcm -type f ! -name '*.so' ! -name '*.c' ! -name '*.html' ! -path '*/__pycache__/*' -print0
        find packaging -maxdepth 1 -type f -print0; } | sort -z | xargs -0 sha256sum
      sha256sum setup.py pyproject.toml
    } | sha256sum | cut -d' ' -f1
}

stamp=.cache/binary.stamp
want=$(inputs_hash)
if [ -x dist/kvcm ] && [ -x dist/kvcm-onedir/kvcm ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    echo "dist/kvcm and dist/kvcm-onedir are up to date"
    exit 0
fi
if ! tests/setup/debian.sh prereq-binary "the frozen-binary tests" readelf:binutils strip:binutils objdump:binutils; then
    [ "${CI:-}" = true ] && exit 1
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "prereq-binary: the Debian 11 build root needs root (debootstrap, chroot); the" \
         "frozen-binary tests will skip (KVCM_BUILD_ROOT=host make binary ONEDIR=1 builds one" \
         "bound to this host's glibc)" >&2
    [ "${CI:-}" = true ] && exit 1
    exit 0
fi
rm -f "$stamp"
make binary ONEDIR=1
mkdir -p .cache
echo "$want" > "$stamp"
