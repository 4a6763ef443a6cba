"""CPU runtime settings for the whole process, applied once on `import jaxgpt` (before jax starts).

glibc malloc. XLA:CPU allocates each execution's temporaries as one block (hundreds of MB for a
training step) and frees it at the end. glibc serves a block above its mmap threshold with a
fresh mmap(), and a thread other than the main one from an arena capped at 64 MB, so such blocks
are always mmap()ed: every step page-faults its whole working set back in. Measured on the
6-layer 384-wide benchmark config: 240k minor faults and ~0.7 s of kernel time per step, none
after this change. One arena and high mmap/trim thresholds keep freed blocks in the heap for
the next step; the price is that the process keeps its peak heap instead of returning it.
Applied after jax has started its threads it still helps (the thresholds are global), less.

Skipped when the user already tunes malloc (MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES set), when JAX_PLATFORMS names no cpu backend, when
JAXGPT_NO_CPU_TUNING=1, and off glibc. XLA flags: none is set here. The ones tried for training
on XLA:CPU (disabling YNNPACK fusions, oneDNN, XNNPACK dot fusions) measured within noise of the
defaults once the training step itself stopped wasting work; see scripts/bench_train.py and
scripts/bench_matmul.py.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8
_USER_MALLOC_VARS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                     "GLIBC_TUNABLES")

applied: dict = {}  # what was changed, for diagnostics


def _wants_cpu() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    return not platforms or "cpu" in platforms.lower().split(",")


def tune_malloc() -> bool:
    """Set the glibc malloc options described above; True if they were applied."""
    if (not sys.platform.startswith("linux") or os.environ.get("JAXGPT_NO_CPU_TUNING") == "1"
            or any(v in os.environ for v in _USER_MALLOC_VARS) or not _wants_cpu()):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    # -1 is SIZE_MAX for the size_t thresholds: a GPT-2 124M step's temporaries exceed 2 GiB,
    # the largest positive int mallopt takes. M_MMAP_MAX=0 keeps even those in the heap.
    ok = all(mallopt(opt, val) == 1 for opt, val in (
        (_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, -1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
    applied["malloc"] = ok
    return ok


tune_malloc()
