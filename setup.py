"""Builds the single extension module kvcm._core from kvcm/_core.pyx.

Switches (environment variables, as uvloop and asyncpg do):
  KVCM_ANNOTATE=1   write kvcm/_core.html, Cython's annotated view of the C it generates
  KVCM_DEBUG=1      -O0 -g, Cython bounds/wraparound checks on, for gdb and sanitizers
  KVCM_TRACE=1      line tracing, so coverage and profilers see inside the core
  KVCM_NO_CORE=1    leave the core out: `make` installs kvcm editable this way, then compiles
                    the core in place once (`setup.py build_ext --inplace`), not twice
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


debug = _flag("KVCM_DEBUG")
trace = _flag("KVCM_TRACE")

directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": debug,
    "cdivision": True,
    "embedsignature": True,
}
macros = []
if trace:
    directives["linetrace"] = True
    macros.append(("CYTHON_TRACE_NOGIL", "1"))

extra_compile_args = ["-O0", "-g"] if debug else ["-O3"]
extra_compile_args += ["-Wno-unused-function"]

core = Extension(
    "kvcm._core",
    sources=["kvcm/_core.pyx"],
    include_dirs=["kvcm"],
    depends=[os.path.join("kvcm", f) for f in os.listdir("kvcm") if f.endswith((".h", ".pxi", ".pxd"))],
    define_macros=macros,
    extra_compile_args=extra_compile_args,
)

setup(
    ext_modules=[] if _flag("KVCM_NO_CORE") else cythonize(
        [core],
        compiler_directives=directives,
        annotate=_flag("KVCM_ANNOTATE"),
    ),
    package_data={"kvcm": ["py.typed", "_core.pyi"]},
)
