"""The int8 weight-only product kernel for XLA:CPU (int8_matmul.cc), called through JAX's FFI.

    y_OxB = matmul_out_in(q_OxI, scale_Ox1, x_IxB)   # scale * (q @ x), float32

`pip install` builds int8_matmul.cc into a shared library beside this file (setup.py; the build
is optional, so an install without a C++ compiler still succeeds). `available()` says whether
it was built and loaded. jaxgpt/quant.py calls it for CPU products over 1 to 16 rows of
activations (decode, speculative verification) against int8 weights in the (out, in) layout;
larger products (prefill) convert the weights and use XLA's dot. Each quantized weight carries
its choice (`quant.quantize_model(..., kernel=...)`, default JAXGPT_INT8_KERNEL):

    auto     (default) the kernel when it is built, else XLA
    xla      XLA's chunked conversion (quant.py), the reference path
    kernel   the kernel; an error if it was not built
    generic  the kernel's portable C++ loop instead of its AVX-512 one (for tests)
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.machinery
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.errors import UserError

ENV = "JAXGPT_INT8_KERNEL"
CHOICES = ("auto", "xla", "kernel", "generic")
TARGET = "jaxgpt_int8_matmul"
_HERE = os.path.dirname(os.path.abspath(__file__))
_REBUILD = "reinstall with a C++17 compiler: pip install -e ."


def library_path() -> str | None:
    """The built shared library, or None when the install did not build it."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        hits = glob.glob(os.path.join(_HERE, "_int8_matmul*" + suffix))
        if hits:
            return sorted(hits)[0]
    return None


@functools.lru_cache(maxsize=None)
def _register() -> bool:
    path = library_path()
    if path is None:
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(path)
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxgptInt8Matmul), platform="cpu")
    except (OSError, AttributeError):  # built for another platform, or a broken file
        return False
    return True


def check_choice(value: str | None = None) -> str:
    """A kernel choice (default: JAXGPT_INT8_KERNEL, else auto), checked: an unknown value is a
    one-line UserError."""
    v = (os.environ.get(ENV, "auto") if value is None else value).strip().lower() or "auto"
    if v not in CHOICES:
        raise UserError(f"unknown int8 kernel {v!r} ({ENV}; choose from {', '.join(CHOICES)})")
    if v in ("kernel", "generic") and not available():
        raise UserError(f"int8 kernel {v!r}: it was not built ({_REBUILD})")
    return v


def available() -> bool:
    """Whether the kernel is built and loaded into JAX."""
    return _register()


def use_kernel(choice: str) -> bool:
    """Whether a CPU product of a weight quantized with this choice calls the kernel."""
    return choice != "xla" and available()


def matmul_out_in(q_OxI, scale_Ox1, x_IxB, choice: str = "auto"):
    """scale * (q @ x): q (O, I) int8, scale (O, 1), x (I, B) -> (O, B) float32.

    The kernel reads x as (B, I) rows; that transpose is of the few activations, not weights."""
    if not available():  # also registers the target with JAX, on first use
        raise UserError(f"the int8 kernel was not built ({_REBUILD})")
    O, B = q_OxI.shape[0], x_IxB.shape[1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((O, B), jnp.float32),
                            vmap_method="sequential")
    return call(q_OxI, scale_Ox1.astype(jnp.float32).reshape(O, 1), x_IxB.T.astype(jnp.float32),
                generic=np.int64(choice == "generic"))
