# Two commands do all set-up on a fresh machine: `make test` and `make run`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: build test run bench demo annotate clean binary prereq-chromium prereq-dynamo prereq-iproute2 \
	prereq-binary prereq-bullseye

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "setuptools>=65" wheel "Cython>=3.0,<3.4"
	KVCM_WERROR=1 $(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

# Recompiles the core only when a .pyx/.pxi/.h changed (setup.py lists them as depends).
# Warnings of Cython and of the C compiler fail this build (KVCM_WERROR, setup.py).
build: $(STAMP)
	KVCM_WERROR=1 $(PY) setup.py -q build_ext --inplace

test: build prereq-chromium prereq-dynamo prereq-iproute2 prereq-binary prereq-bullseye
	$(PY) -m pytest

# Test prerequisites: each installs (or finds) what some tests need, and says why when it
# cannot; those tests then skip with that reason (and fail under CI=true). Cached under .cache/.
# Debian's chromium, for the status page's browser tests (apt-get, as root).
prereq-chromium:
	tests/setup/chromium.sh

# dist/kvcm and dist/kvcm-onedir, frozen in the Debian 11 build root (as root), again only
# when one of their sources is newer.
BINARY_INPUTS := setup.py pyproject.toml $(shell find kvcm packaging -type f \( -name '*.py' \
	-o -name '*.pyx' -o -name '*.pxi' -o -name '*.pxd' -o -name '*.h' -o -name '*.pyi' \
	-o -name '*.typed' -o -name '*.sh' -o -name '*.spec' \) -not -path '*/__pycache__/*')
prereq-binary: dist/kvcm-onedir/kvcm
dist/kvcm-onedir/kvcm: $(BINARY_INPUTS)
	tests/setup/binary.sh

# .cache/bullseye, a minimal Debian 11 root (debootstrap, as root) the binary is tested in.
prereq-bullseye:
	tests/setup/bullseye.sh

# Debian's iproute2 (`ip netns`), for the tests whose client has an address of its own (apt-get,
# as root).
prereq-iproute2:
	tests/setup/iproute2.sh

# NVIDIA Dynamo's indexer in a venv of its own (.cache/dynamo-venv): the peer of the
# `kvcm bench index --target dynamo` tests
prereq-dynamo:
	PYTHON=$(PYTHON) tests/setup/dynamo.sh

run: build
	$(VENV)/bin/kvcm serve

bench: build
	$(PY) benchmarks/run.py

# a short `kvcm bench routing`: kvcm serve + three `kvcm sim` engines, every routing policy
demo: build
	$(VENV)/bin/kvcm bench routing --engines 3 --requests 60 --repeats 1

# dist/kvcm (PyInstaller onefile, glibc >= 2.28) + dist/THIRD_PARTY_LICENSES; `make binary
# ONEDIR=1` adds dist/kvcm-onedir/. Frozen in a Debian 11 build root made the first time
# under .cache/build-root (packaging/build.sh; KVCM_BUILD_ROOT=host: with .venv instead).
binary:
	KVCM_ONEDIR=$(if $(ONEDIR),1,0) PYTHON=$(PY) packaging/build.sh

annotate: $(STAMP)
	KVCM_ANNOTATE=1 $(PY) setup.py -q build_ext --inplace --force

clean:
	rm -rf build kvcm/_core.c kvcm/_core.html kvcm/*.so
