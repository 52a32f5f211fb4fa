#!/usr/bin/env bash
# Builds the kvcm binary (DESIGN.md §8). `make binary` runs it.
#
#   packaging/build.sh [--onedir] [--clean]
#
# kvcm is frozen (packaging/freeze.sh) inside a Debian 11 build root with a CPython built
# there (packaging/build-root.sh; created once under .cache/build-root, about 5 minutes), so
# the binary needs nothing newer than glibc 2.28: RHEL 8 and 9, Debian 11 and 12, Ubuntu 20.04
# and newer. The sources are copied into the root; the outputs come back to dist/ (see
# freeze.sh). Needs root (debootstrap, chroot), binutils and the network (Debian's archive and
# PyPI, through the host's pip cache).
#
# KVCM_BUILD_ROOT=host freezes with the checkout's venv instead (`make build` first): no root
# needed, but the binary then needs this host's glibc.
set -euo pipefail
cd "$(dirname "$0")/.."

GLIBC_FLOOR=2.28
start=$SECONDS
onedir=${KVCM_ONEDIR:-0}
for arg in "$@"; do
    case "$arg" in
        --onedir) onedir=1 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    esac
done
build_root=${KVCM_BUILD_ROOT:-.cache/build-root}

if [ "$build_root" = host ]; then
    packaging/freeze.sh "$@"
else
    if [ "$(id -u)" != 0 ]; then
        echo "packaging/build.sh: the Debian 11 build root needs root (debootstrap, chroot);" \
             "run as root, or KVCM_BUILD_ROOT=host for a binary bound to this host's glibc" >&2
        exit 1
    fi
    packaging/build-root.sh "$build_root"
    # The sources (no build outputs) into a fresh directory of the root.
    src=$build_root/build/src
    rm -rf "$src"
    mkdir -p "$src"
    tar -c --exclude='*.so' --exclude='*.c' --exclude='*.html' --exclude=__pycache__ \
        kvcm packaging setup.py pyproject.toml README.md | tar -x -C "$src"
    revision=${KVCM_GIT_REVISION:-$(python3 -c 'from kvcm._build_info import source_revision; print(source_revision() or "")')}
    pip_cache=${PIP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pip}
    packaging/in-root.sh "$build_root" --net --bind "$pip_cache" /root/.cache/pip -- \
        /usr/bin/env -C /build/src -u PIP_FIND_LINKS -u PIP_CONSTRAINT HOME=/root PYTHON=/opt/venv/bin/python KVCM_CORE_CACHE=/build/core \
        KVCM_GIT_REVISION="$revision" KVCM_GLIBC_FLOOR="$GLIBC_FLOOR" KVCM_ONEDIR="$onedir" \
        /bin/bash packaging/freeze.sh --install "$@"
    rm -rf dist/kvcm dist/kvcm-onedir
    mkdir -p dist
    cp -a "$src"/dist/. dist/
fi

# The binary must run with nothing but the system around it.
bare_home=$(mktemp -d) bare_tmp=$(mktemp -d)
trap 'rm -rf "$bare_home" "$bare_tmp"' EXIT
env -i PATH=/usr/bin:/bin HOME="$bare_home" TMPDIR="$bare_tmp" dist/kvcm version
if [ "$onedir" != 0 ]; then
    env -i PATH=/usr/bin:/bin HOME="$bare_home" TMPDIR="$bare_tmp" dist/kvcm-onedir/kvcm version >/dev/null
    echo "dist/kvcm-onedir: $(du -sh dist/kvcm-onedir | cut -f1)"
fi
echo "dist/kvcm: $(stat -c %s dist/kvcm) bytes ($(du -h dist/kvcm | cut -f1)); built in $((SECONDS - start)) s"
