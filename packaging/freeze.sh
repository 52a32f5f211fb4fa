#!/usr/bin/env bash
# Freezes kvcm into one executable with PyInstaller (DESIGN.md §8), with the Python it runs
# under. `make binary` (packaging/build.sh) runs it inside the Debian 11 build root; with
# the checkout's venv it freezes against this host's glibc instead.
#
#   packaging/freeze.sh [--onedir] [--clean] [--install]
#
# --install   first install the build tools and kvcm's dependencies (pyproject.toml) into
#             $PYTHON's environment and build the core, reusing a core built from the same
#             sources ($KVCM_CORE_CACHE): what the build root's venv needs
#
# Outputs (dist/):
#   kvcm                     the onefile binary
#   kvcm-onedir/             with --onedir (or KVCM_ONEDIR=1): the same, unpacked (faster start)
#   THIRD_PARTY_LICENSES     what is inside and under which licences (packaging/licenses.py)
#   kvcm.bundle.json         the bundle manifest the licence list is made from
#   kvcm.glibc               the glibc the binary needs, and which files need it
#
# Environment: PYTHON (default .venv/bin/python, with kvcm's dependencies installed and the
# core built: `make build`), SOURCE_DATE_EPOCH (build date), KVCM_GIT_REVISION (revision
# when building from a copy without .git), PYINSTALLER_REQ (pip requirement, default below),
# KVCM_GLIBC_FLOOR (fail if the bundle needs a newer glibc than this).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
PYINSTALLER_REQ=${PYINSTALLER_REQ:-"pyinstaller>=6.10,<7"}
ONEDIR=${KVCM_ONEDIR:-0}
CLEAN=()
INSTALL=0
for arg in "$@"; do
    case "$arg" in
        --onedir) ONEDIR=1 ;;
        --clean) CLEAN=(--clean) ;;
        --install) INSTALL=1 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "packaging/freeze.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

if [ ! -x "$PY" ]; then
    echo "packaging/freeze.sh: $PY not found: run 'make build' first (or set PYTHON)" >&2
    exit 1
fi
if [ "$INSTALL" = 1 ]; then
    # The build requirements and dependencies as pyproject.toml declares them.
    mapfile -t requirements < <("$PY" -c '
import tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)
print("\n".join(project["build-system"]["requires"] + project["project"]["dependencies"]))')
    "$PY" -m pip install -q "${requirements[@]}" "$PYINSTALLER_REQ"
    core_key=$(shopt -s nullglob; cat setup.py kvcm/*.pyx kvcm/*.pxi kvcm/*.pxd kvcm/*.h | sha256sum | cut -c1-16)
    cached=${KVCM_CORE_CACHE:+$KVCM_CORE_CACHE/$core_key}
    if [ -n "$cached" ] && ls "$cached"/_core*.so >/dev/null 2>&1; then
        cp "$cached"/_core*.so kvcm/
        echo "core: reused the build of these sources ($core_key)"
    else
        "$PY" setup.py -q build_ext --inplace
        if [ -n "$cached" ]; then
            mkdir -p "$cached"
            cp kvcm/_core*.so "$cached/"
        fi
    fi
fi
if ! ls kvcm/_core*.so >/dev/null 2>&1; then
    echo "packaging/freeze.sh: kvcm/_core is not built: run 'make build' first" >&2
    exit 1
fi
if [ "$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("Py_ENABLE_SHARED") or 0)')" != 1 ]; then
    echo "packaging/freeze.sh: $PY is not built with --enable-shared; PyInstaller needs libpython" >&2
    exit 1
fi
for tool in readelf strip objdump; do
    command -v "$tool" >/dev/null || { echo "packaging/freeze.sh: $tool (binutils) is needed" >&2; exit 1; }
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
"$PY" packaging/glibc_floor.py ${KVCM_GLIBC_FLOOR:+--at-most "$KVCM_GLIBC_FLOOR"} dist/kvcm \
    $([ "$ONEDIR" != 0 ] && echo dist/kvcm-onedir) | tee dist/kvcm.glibc
