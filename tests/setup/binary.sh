#!/usr/bin/env bash
# Test prerequisite `make prereq-binary`: dist/kvcm and dist/kvcm-onedir/kvcm, frozen in the
# Debian 11 build root (packaging/build.sh). Make runs it only when a source of the binary
# is newer than dist/kvcm-onedir/kvcm. Without root it says why and builds nothing: the
# binary tests then skip (and fail under CI=true).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" != 0 ]; then
    echo "prereq-binary: not root, so no Debian 11 build root: the binary tests skip" \
         "(KVCM_BUILD_ROOT=host make binary ONEDIR=1 builds one for this host's glibc)" >&2
    exit 0
fi
exec packaging/build.sh --onedir
