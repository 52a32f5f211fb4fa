#!/usr/bin/env bash
# Freezes kvcm into one executable with PyInstaller (DESIGN.md §8). `make binary` runs it.
#
#   packaging/build.sh [--onedir] [--clean]
#
# Outputs (dist/):
#   kvcm                     the onefile binary
#   kvcm-onedir/             with --onedir (or KVCM_ONEDIR=1): the same, unpacked (faster start)
#   THIRD_PARTY_LICENSES     what is inside and under which licences (packaging/licenses.py)
#   kvcm.bundle.json         the bundle manifest the licence list is made from
#
# Environment: PYTHON (default .venv/bin/python, with kvcm's dependencies installed and the
# core built: `make build`), SOURCE_DATE_EPOCH (build date), KVCM_GIT_REVISION (revision
# when building from a copy without .git), PYINSTALLER_REQ (pip requirement, default below).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
PYINSTALLER_REQ=${PYINSTALLER_REQ:-"pyinstaller>=6.10,<7"}
ONEDIR=${KVCM_ONEDIR:-0}
CLEAN=()
for arg in "$@"; do
    case "$arg" in
        --onedir) ONEDIR=1 ;;
        --clean) CLEAN=(--clean) ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "packaging/build.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

start=$(date +%s.%N)
if [ ! -x "$PY" ]; then
    echo "packaging/build.sh: $PY not found: run 'make build' first (or set PYTHON)" >&2
    exit 1
fi
if ! ls kvcm/_core*.so >/dev/null 2>&1; then
    echo "packaging/build.sh: kvcm/_core is not built: run 'make build' first" >&2
    exit 1
fi
if [ "$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("Py_ENABLE_SHARED") or 0)')" != 1 ]; then
    echo "packaging/build.sh: $PY is not built with --enable-shared; PyInstaller needs libpython" >&2
    exit 1
fi
for tool in readelf strip objdump; do
    command -v "$tool" >/dev/null || { echo "packaging/build.sh: $tool (binutils) is needed" >&2; exit 1; }
done
if ! "$PY" -c 'import PyInstaller' 2>/dev/null; then
    echo "installing $PYINSTALLER_REQ"
    "$PY" -m pip install -q "$PYINSTALLER_REQ"
fi

echo "PyInstaller $("$PY" -m PyInstaller --version), $("$PY" -c 'import sys; print("Python", sys.version.split()[0])')"
rm -rf dist/kvcm dist/kvcm-onedir
KVCM_ONEDIR=$ONEDIR "$PY" -m PyInstaller --noconfirm --log-level WARN "${CLEAN[@]}" \
    --distpath dist --workpath build/pyinstaller packaging/kvcm.spec
"$PY" packaging/licenses.py dist/kvcm.bundle.json dist/THIRD_PARTY_LICENSES
"$PY" packaging/glibc_floor.py dist/kvcm.bundle.json dist/kvcm | tee dist/kvcm.glibc

# The binary must run with nothing but the system around it.
bare_home=$(mktemp -d) bare_tmp=$(mktemp -d)
trap 'rm -rf "$bare_home" "$bare_tmp"' EXIT
env -i PATH=/usr/bin:/bin HOME="$bare_home" TMPDIR="$bare_tmp" dist/kvcm version
if [ "$ONEDIR" != 0 ]; then
    env -i PATH=/usr/bin:/bin HOME="$bare_home" TMPDIR="$bare_tmp" dist/kvcm-onedir/kvcm version >/dev/null
    echo "dist/kvcm-onedir: $(du -sh dist/kvcm-onedir | cut -f1)"
fi
"$PY" - "$start" <<'EOF'
import os, sys, time
size = os.path.getsize("dist/kvcm")
print("dist/kvcm: %d bytes (%.1f MiB); built in %.0f s" % (size, size / 2**20, time.time() - float(sys.argv[1])))
EOF
