"""Builds jaxgpt/kernels/int8_matmul.cc, the int8 product kernel called through JAX's FFI
(everything else about the package is in pyproject.toml).

The kernel needs only the header-only FFI API that jaxlib ships (`jaxlib/include`), so jaxlib
is a build requirement and nothing links against it. The build is optional: without a C++17
compiler the install still succeeds, and jaxgpt falls back to XLA's own path
(jaxgpt/kernels/int8.py says which one runs).
"""

import importlib.util
import os
import sys

from setuptools import Extension, setup


def _jaxlib_include() -> list[str]:
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return []
    path = os.path.join(list(spec.submodule_search_locations)[0], "include")
    return [path] if os.path.isdir(path) else []


_unix = sys.platform != "win32"
setup(ext_modules=[Extension(
    "jaxgpt.kernels._int8_matmul",
    sources=["jaxgpt/kernels/int8_matmul.cc"],
    include_dirs=_jaxlib_include(),
    language="c++",
    extra_compile_args=["-std=c++17", "-O3", "-fvisibility=hidden", "-w"] if _unix else ["/std:c++17", "/O2"],
    optional=True,
)])
