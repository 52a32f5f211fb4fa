"""kvcm._core.sha256 (both kernels) and kvcm._reference.sha256 against hashlib."""

import hashlib
import os
import subprocess
import sys
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SHA256_KERNELS
from kvcm import _core, _reference

# Around the 64-byte block and the 56-byte padding limit (one vs two tail blocks).
EDGE_LENGTHS = [0, 1, 55, 56, 63, 64, 65, 119, 120, 127, 128]

_SETTINGS = settings(max_examples=200, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


def _pattern(n, salt=0):
    return bytes((i * 131 + salt * 7 + (i >> 8)) & 0xFF for i in range(n))




@pytest.mark.parametrize("n", EDGE_LENGTHS)
def test_core_sha256_matches_hashlib_at_edge_length(kernel, n):
    for salt in range(3):
        data = _pattern(n, salt)
        assert _core.sha256(data) == hashlib.sha256(data).digest()


def test_core_sha256_matches_hashlib_for_every_length_up_to_300(kernel):
    data = _pattern(300)
    for n in range(301):
        assert _core.sha256(data[:n]) == hashlib.sha256(data[:n]).digest(), n


@pytest.mark.parametrize("offset", [1, 3, 7])
def test_core_sha256_handles_unaligned_input(kernel, offset):
    buf = bytearray(_pattern(4096 + offset))
    view = memoryview(buf)[offset:]
    assert _core.sha256(view) == hashlib.sha256(view).digest()


def test_core_sha256_of_one_mebibyte(kernel):
    data = os.urandom(1 << 20) + b"tail"  # not a multiple of 64
    assert _core.sha256(data) == hashlib.sha256(data).digest()


@_SETTINGS
@given(data=st.binary(max_size=2000))
def test_core_sha256_matches_hashlib_on_random_bytes(kernel, data):
    assert _core.sha256(data) == hashlib.sha256(data).digest()


@pytest.mark.parametrize("n", EDGE_LENGTHS + [1 << 20])
def test_reference_sha256_matches_hashlib(n):
    data = _pattern(n)
    assert _reference.sha256(data) == hashlib.sha256(data).digest()


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview, lambda b: memoryview(bytearray(b))],
                         ids=["bytes", "bytearray", "memoryview", "memoryview-of-bytearray"])
@pytest.mark.parametrize("n", [0, 5, 64, 200])
def test_sha256_accepts_bytes_like(impl, wrap, n):
    data = _pattern(n)
    assert impl.sha256(wrap(data)) == hashlib.sha256(data).digest()


def test_sha256_of_typed_array_hashes_its_raw_bytes(impl):
    a = array("I", range(100))
    assert impl.sha256(a) == hashlib.sha256(a.tobytes()).digest()


def test_sha256_rejects_str(impl):
    with pytest.raises(TypeError):
        impl.sha256("abc")


def _backend_in_subprocess(value):
    env = dict(os.environ)
    env.pop("KVCM_SHA256", None)
    if value is not None:
        env["KVCM_SHA256"] = value
    out = subprocess.run([sys.executable, "-c", "import kvcm._core as c; print(c.sha256_backend())"],
                         env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("value", ["portable", "PORTABLE"])
def test_env_var_forces_portable_kernel_at_import(value):
    assert _backend_in_subprocess(value) == "portable"


def test_default_kernel_at_import_is_the_one_select_picks(monkeypatch):
    default = _backend_in_subprocess(None)
    assert default in SHA256_KERNELS
    monkeypatch.delenv("KVCM_SHA256", raising=False)
    try:
        assert _core._select_sha256_kernel() == default
    finally:
        monkeypatch.undo()
        _core._select_sha256_kernel()
