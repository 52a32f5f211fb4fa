"""setup.py's KVCM_WERROR switch: Cython's and the C compiler's warnings are errors in the
builds of `make build` and CI (a Cython warning there is a bug: a negative index with
wraparound checks off is undefined behaviour), while a plain `pip install .` keeps building
with warnings. The C compile itself runs with -Werror in every `make test`."""

import importlib.util
import subprocess
import sys

import pytest

from conftest import ROOT


def setup_module_from_tree():
    spec = importlib.util.spec_from_file_location("kvcm_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)     # setup() only runs as a script
    return module


@pytest.mark.parametrize("value, strict", [(None, False), ("0", False), ("1", True)])
def test_werror_is_a_switch(monkeypatch, value, strict):
    if value is None:
        monkeypatch.delenv("KVCM_WERROR", raising=False)
    else:
        monkeypatch.setenv("KVCM_WERROR", value)
    monkeypatch.chdir(ROOT)
    core, directives = setup_module_from_tree().core_extension()
    assert ("-Werror" in core.extra_compile_args) == strict
    assert directives["wraparound"] is False and directives["boundscheck"] is False


def test_the_core_cythonizes_without_a_warning(tmp_path):
    # In a process of its own: Cython's options are global.
    code = ("import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('kvcm_setup', 'setup.py')\n"
            "setup = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(setup)\n"
            "setup.cythonize_core(build_dir=sys.argv[1], force=True, quiet=True)\n")
    env = {"KVCM_WERROR": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(tmp_path.rglob("_core.c"))
