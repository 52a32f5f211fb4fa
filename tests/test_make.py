"""The Makefile's promises, checked with `make -n` (print, do not run) on a copy of the files
it reads: `make run` installs only what serving needs, and does nothing but start kvcm when
nothing changed; `make test` prepares every test prerequisite first; Python >= 3.11
everywhere."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import tomllib

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")

CORE_SOURCES = ["kvcm/_core.pyx", "setup.py"] + [str(p.relative_to(ROOT)) for p in
                                                  sorted((ROOT / "kvcm").glob("*.pxi")) + sorted((ROOT / "kvcm").glob("*.pxd"))
                                                  + sorted((ROOT / "kvcm").glob("*.h"))]


@pytest.fixture
def tree(tmp_path):
    """The files the Makefile's rules name, copied (mtimes kept) into tmp_path."""
    for name in ["Makefile", "pyproject.toml"] + CORE_SOURCES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / name)
    return tmp_path


def make(tree, *args):
    """make in the copy, not as part of an outer make (`make test` runs these tests)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", *args], cwd=tree, env=env, capture_output=True, text=True, timeout=60)


def dry_run(tree, *targets):
    proc = make(tree, "-n", "PYTHON=%s" % sys.executable, *targets)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def built(tree):
    """The state after a set-up: stamps and the compiled core newer than every source."""
    later = time.time() + 10
    suffix = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    (tree / ".venv").mkdir()
    for i, name in enumerate([".venv/.installed", ".venv/.installed-test", "kvcm/_core" + suffix]):
        (tree / name).touch()
        os.utime(tree / name, (later + i, later + i))


def test_make_run_on_a_fresh_machine_installs_only_what_serving_needs(tree):
    lines = dry_run(tree, "run")
    installs = [line for line in lines if "pip install" in line]
    assert any(line.endswith("pip install -q --no-build-isolation -e .") for line in installs), lines
    assert any("setup.py -q build_ext --inplace" in line for line in lines), "the core, compiled once, in place"
    assert not any("test" in line for line in installs), "make run must not install the test extra"
    assert lines[-1] == ".venv/bin/kvcm serve"


def test_make_run_only_starts_kvcm_when_nothing_changed(tree):
    built(tree)
    assert dry_run(tree, "run") == [".venv/bin/kvcm serve"], "no install, no compile, no setuptools output"


def test_a_changed_core_source_is_compiled_again_quietly(tree):
    built(tree)
    future = time.time() + 60
    os.utime(tree / "kvcm" / "_events.pxi", (future, future))
    lines = dry_run(tree, "build")
    assert any("setup.py -q build_ext --inplace" in line and "PYTHONWARNINGS=ignore" in line for line in lines), lines
    assert not any("pip install" in line for line in lines)


def test_make_test_prepares_every_prerequisite_before_pytest(tree):
    built(tree)
    lines = dry_run(tree, "test")
    assert lines[-1] == ".venv/bin/python -m pytest"
    for script in ("tests/setup/binary.sh", "tests/setup/valkey.sh", "tests/setup/debian.sh"):
        assert any(script in line for line in lines[:-1]), (script, lines)
    prereqs = set(re.findall(r"^(prereq-[a-z]+):", (ROOT / "Makefile").read_text(), re.M))
    test_rule = re.search(r"^test:(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    assert prereqs and prereqs <= set(test_rule)


def test_python_311_is_required_everywhere():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"      # the code uses tomllib
    readme = (ROOT / "README.md").read_text()
    assert "Python ≥ 3.11" in readme and "3.10" not in readme
    assert "sys.version_info < (3, 11)" in (ROOT / "Makefile").read_text()


def test_the_make_check_names_the_python_it_refuses(tmp_path, tree):
    old = tmp_path / "python3.10"
    old.write_text("#!/bin/sh\nexec %s -c 'import sys; sys.version_info = (3, 10, 12); "
                   "sys.version = \"3.10.12 (fake)\"; exec(sys.argv[2])' -c \"$2\"\n" % sys.executable)
    old.chmod(0o755)
    proc = make(tree, "PYTHON=%s" % old, ".venv/.installed")
    assert proc.returncode != 0
    assert "kvcm needs Python >= 3.11; %s is 3.10.12" % old in proc.stderr
    assert not (tree / ".venv").exists()


def test_ci_runs_make_test():
    text = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", text, re.M)
    assert pathlib.Path(ROOT / ".gitignore").read_text().count(".cache/") == 1
