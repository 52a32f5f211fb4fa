"""Builds the single extension module kvcm._core from kvcm/_core.pyx.

Switches (environment variables, as uvloop and asyncpg do):
  KVCM_ANNOTATE=1   write kvcm/_core.html, Cython's annotated view of the C it generates
  KVCM_DEBUG=1      -O0 -g, Cython bounds/wraparound checks on, for gdb and sanitizers
  KVCM_TRACE=1      line tracing, so coverage and profilers see inside the core
  KVCM_WERROR=1     Cython's and the C compiler's warnings are errors (`make build` and CI
                    set it: a warning there is a bug, such as a negative index with
                    wraparound checks off); a plain `pip install .` builds with warnings
  KVCM_NO_CORE=1    leave the core out: `make` installs kvcm editable this way, then compiles
                    the core in place once (`setup.py build_ext --inplace`), not twice
"""
import os

from Cython.Build import cythonize
from Cython.Compiler import Options
from setuptools import Extension, setup


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


def core_extension():
    """(the Extension, Cython's compiler directives) as the switches set them."""
    debug = _flag("KVCM_DEBUG")
    directives = {
        "language_level": 3,
        "boundscheck": debug,
        "wraparound": debug,
        "cdivision": True,
        "embedsignature": True,
    }
    macros = []
    if _flag("KVCM_TRACE"):
        directives["linetrace"] = True
        macros.append(("CYTHON_TRACE_NOGIL", "1"))
    extra_compile_args = ["-O0", "-g"] if debug else ["-O3"]
    extra_compile_args += ["-Wno-unused-function"]
    if _flag("KVCM_WERROR"):
        extra_compile_args.append("-Werror")
    core = Extension(
        "kvcm._core",
        sources=["kvcm/_core.pyx"],
        include_dirs=["kvcm"],
        depends=[os.path.join("kvcm", f) for f in os.listdir("kvcm") if f.endswith((".h", ".pxi", ".pxd"))],
        define_macros=macros,
        libraries=["dl"],   # dlopen/dlsym (kvcm/zmq_lane.h); part of libc from glibc 2.34
        extra_compile_args=extra_compile_args,
    )
    return core, directives


def cythonize_core(**options):
    """kvcm/_core.pyx through Cython (its warnings fail the build under KVCM_WERROR)."""
    core, directives = core_extension()
    Options.warning_errors = _flag("KVCM_WERROR")
    return cythonize([core], compiler_directives=directives, annotate=_flag("KVCM_ANNOTATE"), **options)


if __name__ == "__main__":
    setup(
        ext_modules=[] if _flag("KVCM_NO_CORE") else cythonize_core(),
        package_data={"kvcm": ["py.typed", "_core.pyi"]},
    )
