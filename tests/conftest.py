"""Shared fixtures: the two implementations of the core, and the shared test data."""

import logging
import os
import pathlib

import pytest

from kvcm import _core, _reference
from redis_server import server_kinds, start_server

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("KVCM_SHARED", ROOT.parent / "shared"))


@pytest.fixture(params=["core", "reference"])
def impl(request):
    """kvcm._core and kvcm._reference: every case runs against both."""
    return _core if request.param == "core" else _reference


SHA256_KERNELS = ["sha-ni", "portable"]


@pytest.fixture(params=SHA256_KERNELS)
def kernel(request):
    """Selects one SHA-256 kernel of the core for the test (skips sha-ni on a CPU without it),
    then restores the default one."""
    try:
        with pytest.MonkeyPatch.context() as mp:
            if request.param == "portable":
                mp.setenv("KVCM_SHA256", "portable")
            else:
                mp.delenv("KVCM_SHA256", raising=False)
            name = _core._select_sha256_kernel()
            if request.param == "sha-ni" and name != "sha-ni":
                pytest.skip("this CPU has no SHA-NI")
            assert name == request.param
            assert _core.sha256_backend() == request.param
            yield name
    finally:
        _core._select_sha256_kernel()  # the environment as it was before the test


JSON_IDS_KERNELS = ["avx512", "scalar"]


@pytest.fixture(params=JSON_IDS_KERNELS)
def ids_kernel(request):
    """Selects how the core reads compact runs of token ids (skips avx512 on a CPU without
    AVX-512 VBMI2), then restores the default."""
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KVCM_JSON_IDS", request.param)
            name = _core._select_json_ids_kernel()
            if request.param == "avx512" and name != "avx512":
                pytest.skip("this CPU has no AVX-512 VBMI2")
            assert name == request.param
            yield name
    finally:
        _core._select_json_ids_kernel()


@pytest.fixture(scope="session")
def shared():
    """../shared (vectors, fixtures); tests that need it skip when the tree was copied alone."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not beside the project")
    return SHARED


def pytest_report_header(config):
    if "redis" not in server_kinds():
        return "shared index: Valkey only (no redis-server on PATH; .ci/run installs it)"
    return None


@pytest.fixture(scope="session", params=server_kinds())
def redis_session(request):
    """One real Redis-protocol server for the session, of each kind: every shared-index test
    runs against Valkey, and against Redis where it is installed (tests/redis_server.py)."""
    server = start_server(kind=request.param)
    yield server
    server.close()


@pytest.fixture
def redis_server(redis_session):
    """The session's server, running and emptied for this test."""
    if redis_session.proc.poll() is not None:
        redis_session.start()
    redis_session.client().flushall()
    return redis_session


@pytest.fixture
def access_log(request):
    """(a logger for an HttpServer's access_log, the messages it got)."""
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())
    logger = logging.getLogger("kvcm.test.access." + request.node.name)
    handler = Collect()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, messages
    logger.removeHandler(handler)
