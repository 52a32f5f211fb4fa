# Two commands do all set-up on a fresh machine: `make test` and `make run`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# kvcm and what serving needs; then the test extra of pyproject.toml on top
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
CORE   := kvcm/_core$(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))' 2>/dev/null)
CORE_SOURCES := kvcm/_core.pyx $(wildcard kvcm/*.pxi kvcm/*.pxd kvcm/*.h) setup.py
# setuptools warns about its own configuration on every run; nothing a user can act on
QUIET  := PYTHONWARNINGS=ignore

.PHONY: build test run bench demo annotate clean binary prereq-binary prereq-bullseye prereq-valkey \
	prereq-systemd prereq-chromium prereq-dynamo prereq-iproute2

$(STAMP): pyproject.toml setup.py
	@$(PYTHON) -c 'import sys; sys.exit("kvcm needs Python >= 3.11; $(PYTHON) is %s" % sys.version.split()[0] if sys.version_info < (3, 11) else 0)'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "setuptools>=65" wheel "Cython>=3.0,<3.4"
	$(QUIET) KVCM_NO_CORE=1 $(PY) -m pip install -q --no-build-isolation -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	@mkdir -p .cache
	$(PY) tests/setup/extra.py test > .cache/test-requirements.txt
	$(PY) -m pip install -q -r .cache/test-requirements.txt
	touch $@

# The core is compiled again only when a .pyx/.pxi/.pxd/.h or setup.py changed. Warnings of
# Cython and of the C compiler fail this build (KVCM_WERROR, setup.py).
$(CORE): $(CORE_SOURCES) | $(STAMP)
	$(QUIET) KVCM_WERROR=1 $(PY) setup.py -q build_ext --inplace
	@touch $@

build: $(CORE)

# The whole suite, nothing skipped: what the tests need is built or installed first, and
# kept (.cache/, .venv/) for the next run.
test: build $(TEST_STAMP) prereq-binary prereq-bullseye prereq-valkey prereq-systemd prereq-chromium prereq-dynamo prereq-iproute2
	$(PY) -m pytest

# Test prerequisites: each builds, installs or finds what some tests need (tests/setup/), and
# says why when it cannot; those tests then skip with that reason (and fail under CI=true).
# Cached under .cache/.
# dist/kvcm and dist/kvcm-onedir, frozen in the Debian 11 build root (as root), rebuilt only
# when their sources changed.
prereq-binary: build $(TEST_STAMP)
	PYTHON=$(PY) tests/setup/binary.sh

# .cache/bullseye, a minimal Debian 11 root (debootstrap, as root) the binary is tested in.
prereq-bullseye:
	tests/setup/bullseye.sh

# the valkey-server of the test extra, for the shared-index tests
prereq-valkey: $(TEST_STAMP)
	PYTHON=$(PY) tests/setup/valkey.sh

# Debian's systemd tools, for the unit tests (apt-get, as root)
prereq-systemd:
	tests/setup/debian.sh prereq-systemd "the unit tests" systemd-analyze:systemd systemd-socket-activate:systemd || true

# Debian's chromium, for the status page's browser tests (apt-get, as root).
prereq-chromium:
	tests/setup/chromium.sh

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
	KVCM_ANNOTATE=1 $(QUIET) $(PY) setup.py -q build_ext --inplace --force

clean:
	rm -rf build .cache kvcm/_core.c kvcm/_core.html kvcm/*.so
