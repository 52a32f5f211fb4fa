"""Shared fixtures: the two implementations of the core, and the shared test data."""

import os
import pathlib

import pytest

from kvcm import _core, _reference

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("KVCM_SHARED", ROOT.parent / "shared"))


@pytest.fixture(params=["core", "reference"])
def impl(request):
    """kvcm._core and kvcm._reference: every case runs against both."""
    return _core if request.param == "core" else _reference


@pytest.fixture(scope="session")
def shared():
    """../shared (vectors, fixtures); tests that need it skip when the tree was copied alone."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not beside the project")
    return SHARED
