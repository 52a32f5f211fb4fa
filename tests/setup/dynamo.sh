#!/usr/bin/env bash
# NVIDIA Dynamo's standalone KV indexer, the peer `kvcm bench index --target dynamo` runs
# beside kvcm, in a venv of its own (never a kvcm dependency): .cache/dynamo-venv, made once
# and reused while the stamp of this version is there. Downloads go through pip's cache.
# When it cannot be made (no PyPI, no venv module), it says why and exits 0: the Dynamo
# tests then skip with that reason (and fail under CI=true).
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=1.6.1
VENV=.cache/dynamo-venv
STAMP=$VENV/.installed-ai-dynamo-runtime-$VERSION
PYTHON=${PYTHON:-python3}

if [ -f "$STAMP" ] && "$VENV/bin/python" -c "import dynamo.indexer" 2>/dev/null; then
    exit 0
fi
rm -rf "$VENV"
if ! { "$PYTHON" -m venv "$VENV" \
       && "$VENV/bin/python" -m pip install -q --disable-pip-version-check "ai-dynamo-runtime==$VERSION" pyzmq msgpack \
       && "$VENV/bin/python" -m dynamo.indexer --help >/dev/null; }; then
    rm -rf "$VENV"
    echo "prereq-dynamo: could not install ai-dynamo-runtime $VERSION into $VENV; the Dynamo tests will skip" >&2
    exit 0
fi
touch "$STAMP"
echo "Dynamo's indexer (ai-dynamo-runtime $VERSION) in $VENV"
