"""Would the host BLAS make the float32 training step faster? XLA's dots vs sgemm custom calls.

    PYTHONPATH=. python scripts/bench_host_blas.py [--config b c] [--rounds 4] [--per 3]

scripts/bench_matmul.py shows XLA:CPU's dot kernels running a training step's products 20-25%
slower than torch's MKL, each product timed on its own. This script asks the follow-up question
on the whole step: build the real training step (`bench_train.setup_jax`) twice, once as
jaxgpt ships it and once with every large product of `cpu_stack` and `cpu_loss` (the
linear layers and the tied head, forward and backward; attention's small batched products stay
in XLA) sent to SciPy's sgemm (OpenBLAS) through an XLA FFI custom call, and time both in
alternating rounds. It also times, per step, the sgemm calls inside the step, and the same
calls on the same shapes run alone from Python, to show how much the product speed changes
once it shares the 2 cores with XLA's own thread pool.

The custom call needs no compiled code: its handler is a ctypes callback with the typed XLA FFI
signature (`XLA_FFI_Error* handler(XLA_FFI_CallFrame*)`, jaxlib/include/xla/ffi/api/c_api.h),
which reads the buffers' data pointers from the call frame and calls sgemm on them in place.
Both variants must reach the same losses; the script checks it.

Prints one JSON line per config. Measured here (2-core Xeon @ 2.5 GHz, AVX-512, 2026-11-23;
`host_blas_speedup` = XLA's ms/step over the host-BLAS variant's):
- SciPy 1.17's OpenBLAS 0.3.31 (SkylakeX kernels): 0.81 and 0.84 on (b), 0.85 on (c). Slower.
- MKL 2026.2 (`--sgemm-lib .../libmkl_rt.so.3`, MKL_THREADING_LAYER=GNU,
  OMP_WAIT_POLICY=passive): 1.165 on (b), 1.098 on (c); its calls took 1.17-1.24x their
  stand-alone time inside the step. Not enough for (c) to reach torch (bench_train's (c) ratio
  is 0.82-0.86), and MKL is a ~1 GB, x86-only install, so jaxgpt does not ship this.
This is the record behind README's "Benchmarks" note; nothing in the package uses it.
"""

from __future__ import annotations

import argparse
import collections
import ctypes as C
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402  (imports jaxgpt first, as the package expects)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


# ----------------------------------------------------------------- the XLA FFI call frame
class _ExtBase(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("type", C.c_int), ("next", C.c_void_p)]


class _ApiVersion(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p),
                ("major_version", C.c_int), ("minor_version", C.c_int)]


class _Metadata(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("api_version", _ApiVersion),
                ("traits", C.c_uint32), ("state_type_id", C.c_int64)]


class _MetadataExt(C.Structure):
    _fields_ = [("extension_base", _ExtBase), ("metadata", C.POINTER(_Metadata))]


class _Buffer(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p),
                ("dtype", C.c_int), ("data", C.c_void_p), ("rank", C.c_int64),
                ("dims", C.POINTER(C.c_int64))]


class _Buffers(C.Structure):  # XLA_FFI_Args and XLA_FFI_Rets share this layout
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p),
                ("size", C.c_int64), ("types", C.c_void_p),
                ("ptrs", C.POINTER(C.POINTER(_Buffer)))]


class _Attrs(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p),
                ("size", C.c_int64), ("types", C.c_void_p), ("names", C.c_void_p),
                ("attrs", C.c_void_p)]


class _CallFrame(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.POINTER(_ExtBase)),
                ("api", C.c_void_p), ("ctx", C.c_void_p), ("stage", C.c_int),
                ("args", _Buffers), ("rets", _Buffers), ("attrs", _Attrs),
                ("future", C.c_void_p)]


_HANDLER = C.CFUNCTYPE(C.c_void_p, C.POINTER(_CallFrame))
_EXTENSION_METADATA = 1
_ONE, _ZERO = C.c_float(1.0), C.c_float(0.0)


_SGEMM_PROTO = C.CFUNCTYPE(None, C.c_char_p, C.c_char_p, *[C.POINTER(C.c_int)] * 3,
                           C.POINTER(C.c_float), C.c_void_p, C.POINTER(C.c_int), C.c_void_p,
                           C.POINTER(C.c_int), C.POINTER(C.c_float), C.c_void_p,
                           C.POINTER(C.c_int))


def load_sgemm(lib: str | None):
    """Fortran sgemm: from a BLAS library file (its `sgemm_` symbol), or by default SciPy's
    (OpenBLAS; the BLAS jaxlib's CPU LAPACK kernels also come from)."""
    if lib:
        return _SGEMM_PROTO(C.cast(C.CDLL(lib).sgemm_, C.c_void_p).value)
    from scipy.linalg import cython_blas
    capsule = cython_blas.__pyx_capi__["sgemm"]
    get_name, get_ptr = C.pythonapi.PyCapsule_GetName, C.pythonapi.PyCapsule_GetPointer
    get_name.restype, get_name.argtypes = C.c_char_p, [C.py_object]
    get_ptr.restype, get_ptr.argtypes = C.c_void_p, [C.py_object, C.c_char_p]
    return _SGEMM_PROTO(get_ptr(capsule, get_name(capsule)))


def sgemm_args(ta, tb, M, N, K, a_ptr, lda, b_ptr, ldb, c_ptr):
    """Arguments for row-major c (M, N) = op(a) @ op(b): column-major c^T = op(b)^T op(a)^T."""
    return ((b"T" if tb else b"N"), (b"T" if ta else b"N"), C.byref(C.c_int(N)),
            C.byref(C.c_int(M)), C.byref(C.c_int(K)), C.byref(_ONE), b_ptr, C.byref(C.c_int(ldb)),
            a_ptr, C.byref(C.c_int(lda)), C.byref(_ZERO), c_ptr, C.byref(C.c_int(N)))


class HostGemm:
    """Registers `host_sgemm_{n,t}{n,t}` on CPU; records each call's shape and seconds."""

    def __init__(self, lib: str | None = None):
        self.sgemm = load_sgemm(lib)
        self.lib = lib or "scipy (OpenBLAS)"
        self.calls = collections.defaultdict(list)  # (ta, tb, M, N, K) -> [seconds]
        self._keep = []
        for ta in (False, True):
            for tb in (False, True):
                h = _HANDLER(self._handler(ta, tb))
                self._keep.append(h)  # XLA holds a raw pointer to it
                jax.ffi.register_ffi_target(self.name(ta, tb),
                                            jax.ffi.pycapsule(C.cast(h, C.c_void_p).value),
                                            platform="cpu")

    @staticmethod
    def name(ta, tb):
        return f"host_sgemm_{'t' if ta else 'n'}{'t' if tb else 'n'}"

    def _handler(self, ta, tb):
        def handler(frame_p):
            frame = frame_p.contents
            ext = frame.extension_start
            if ext and ext.contents.type == _EXTENSION_METADATA:  # XLA asks our FFI version
                md = C.cast(ext, C.POINTER(_MetadataExt)).contents.metadata.contents
                md.api_version = _ApiVersion(C.sizeof(_ApiVersion), None, 0, 1)
                md.traits = 0
                return None
            a, b = frame.args.ptrs[0].contents, frame.args.ptrs[1].contents
            c = frame.rets.ptrs[0].contents
            M, N, K = c.dims[0], c.dims[1], (a.dims[0] if ta else a.dims[1])
            t0 = time.perf_counter()
            self.sgemm(*sgemm_args(ta, tb, M, N, K, a.data, a.dims[1], b.data, b.dims[1], c.data))
            self.calls[(ta, tb, M, N, K)].append(time.perf_counter() - t0)
            return None
        return handler

    def matmul(self, a, b, ta=False, tb=False):
        M = a.shape[1] if ta else a.shape[0]
        N = b.shape[0] if tb else b.shape[1]
        call = jax.ffi.ffi_call(self.name(ta, tb), jax.ShapeDtypeStruct((M, N), jnp.float32))
        return call(a.astype(jnp.float32), b.astype(jnp.float32))

    def alone_seconds(self, key, reps=3):
        """Best time of the same sgemm on fresh arrays, called from Python on its own (after
        one untimed call, which also warms OpenBLAS's buffers and threads)."""
        ta, tb, M, N, K = key
        rng = np.random.default_rng(0)
        a = rng.standard_normal((K, M) if ta else (M, K), dtype=np.float32)
        b = rng.standard_normal((N, K) if tb else (K, N), dtype=np.float32)
        c = np.empty((M, N), np.float32)
        args = sgemm_args(ta, tb, M, N, K, a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1],
                          c.ctypes.data)
        self.sgemm(*args)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            self.sgemm(*args)
            best = min(best, time.perf_counter() - t0)
        return best


# ----------------------------------------------------------------- routing the products
class _RoutedJnp:
    """Stands in for `jnp` inside kernels/cpu_stack / kernels/cpu_loss: the einsums of linear layers and of
    the head become host sgemm calls on (tokens, features) views; everything else is jnp."""

    # spec -> (transpose a, transpose b); every operand is flattened to 2-D over its leading axes
    ROUTES = {
        "...i,io->...o": (False, False),   # x @ w
        "btd,fd->btf": (False, True),      # dy @ w.T
        "btf,df->btd": (False, True),
        "bte,de->btd": (False, True),
        "bti,bto->io": (True, False),      # a.T @ d (weight gradients)
        "bto,bti->oi": (True, False),
        "nd,vd->nv": (False, True),        # head logits
        "nv,vd->nd": (False, False),       # head dx
        "nd,nv->dv": (True, False),        # head dW (transposed)
    }

    def __init__(self, gemm: HostGemm):
        self.gemm = gemm

    def __getattr__(self, name):
        return getattr(jnp, name)

    def einsum(self, spec, a, b, **kw):
        if spec not in self.ROUTES:
            return jnp.einsum(spec, a, b, **kw)
        ta, tb = self.ROUTES[spec]
        a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        y = self.gemm.matmul(a2, b2, ta, tb)
        lead = a.shape[:-1] if not ta and a.ndim > 2 else ()
        return y.reshape(*lead, y.shape[-1]) if lead else y


def build(spec, gemm: HostGemm | None):
    from jaxgpt.kernels import cpu_loss, cpu_stack
    mods = (cpu_stack, cpu_loss)
    saved = [m.jnp for m in mods]
    if gemm is not None:
        for m in mods:
            m.jnp = _RoutedJnp(gemm)
    try:
        return bench_train.setup_jax(spec)  # traces and compiles now, under the routing
    finally:
        for m, j in zip(mods, saved):
            m.jnp = j


def run(name, gemm: HostGemm, rounds, per):
    spec = bench_train.CONFIGS[name]
    gemm.calls.clear()
    sides = {"xla": build(spec, None), "host_blas": build(spec, gemm)}
    if not gemm.calls:
        raise SystemExit("the host-BLAS variant made no sgemm call: routing failed")
    times = {k: [] for k in sides}
    in_step, alone = [], []
    for _ in range(rounds):
        for k, (step, _) in sides.items():
            time.sleep(0.2)  # let the other variant's threads go idle
            gemm.calls.clear()
            times[k] += bench_train._timed(step, per)
        # this round's sgemm calls inside the host-BLAS step, then the same calls alone
        in_step.append(sum(sum(ts) for ts in gemm.calls.values()) / per)
        time.sleep(0.2)
        alone.append(sum(gemm.alone_seconds(key, reps=1) * len(ts)
                         for key, ts in gemm.calls.items()) / per)
    losses = {k: info["losses"] for k, (_, info) in sides.items()}
    same = bool(np.allclose(losses["xla"], losses["host_blas"], rtol=1e-4, atol=1e-4))
    if not same:
        raise SystemExit(f"the two variants disagree: {losses}")
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"config": name, "xla_ms": round(med["xla"], 1),
            "host_blas_ms": round(med["host_blas"], 1),
            "host_blas_speedup": round(med["xla"] / med["host_blas"], 3),
            "sgemm_in_step_ms": round(statistics.median(in_step) * 1e3, 1),
            "same_sgemm_alone_ms": round(statistics.median(alone) * 1e3, 1),
            "sgemm_calls_per_step": sum(len(t) for t in gemm.calls.values()) // per,
            "sgemm_lib": gemm.lib,
            "losses_match": same,
            "timed_steps": rounds * per}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", nargs="+", choices=sorted(bench_train.CONFIGS), default=["b", "c"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per", type=int, default=3, help="timed steps per variant per round")
    ap.add_argument("--sgemm-lib", default=None,
                    help="a BLAS shared library to take sgemm_ from instead of SciPy's, e.g. "
                         "MKL's libmkl_rt.so.3 (with MKL_THREADING_LAYER=GNU)")
    args = ap.parse_args()
    gemm = HostGemm(args.sgemm_lib)  # registers the targets, once per process
    for name in args.config:
        print(json.dumps(run(name, gemm, args.rounds, args.per)), flush=True)


if __name__ == "__main__":
    main()
