"""The benchmark scripts measure what they claim to (no timing here: figures come from runs)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_int8_forms  # noqa: E402
import bench_matmul  # noqa: E402
import bench_train  # noqa: E402


@pytest.mark.parametrize("name", sorted(bench_train.CONFIGS))
def test_bench_matmul_lists_every_product_of_a_training_step(name):
    # Forward, input gradient and weight gradient of every weight matrix: 6 N P FLOPs for the
    # P block weights (+ the tied head when the vocabulary is real), nothing more, nothing less.
    spec = bench_train.CONFIGS[name]
    N = spec["batch_size"] * spec["block_size"]
    D, L, V = spec["n_embd"], spec["n_layer"], spec["vocab_size"]
    block_weights = L * (D * 3 * D + D * D + D * 4 * D + 4 * D * D)
    expected = 6 * N * (block_weights + (D * V if V >= 1024 else 0))
    rows = bench_matmul.products(spec)
    assert sum(2 * r["M"] * r["K"] * r["N"] * r["count"] for r in rows) == expected
    # each product appears once per shape and orientation, so the summary's weights are exact
    assert len({(r["kind"], r["M"], r["K"], r["N"]) for r in rows}) == len(rows)


# ---------------------------------------------------------------- scripts/bench_host_blas.py
@pytest.fixture(scope="module")
def host_gemm():
    import bench_host_blas
    return bench_host_blas.HostGemm()  # registers its custom-call targets, once


@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_host_blas_custom_call_is_the_product(host_gemm, ta, tb):
    import jax
    import numpy as np
    rng = np.random.default_rng(0)
    M, K, N = 5, 7, 3
    a = rng.standard_normal((K, M) if ta else (M, K), dtype=np.float32)
    b = rng.standard_normal((N, K) if tb else (K, N), dtype=np.float32)
    got = jax.jit(lambda x, y: host_gemm.matmul(x, y, ta, tb))(a, b)
    want = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a benchmark script's plumbing; its custom-call equality test stays
def test_host_blas_step_routes_every_linear_product_and_matches(host_gemm):
    import numpy as np
    import bench_host_blas
    spec = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=2, vocab_size=65)
    host_gemm.calls.clear()
    _, host = bench_host_blas.build(spec, host_gemm)  # compiles and runs one step
    # 4 linear layers x (forward, input gradient, weight gradient) per block, 3 for the head
    assert sum(len(t) for t in host_gemm.calls.values()) == spec["n_layer"] * 12 + 3
    _, xla = bench_host_blas.build(spec, None)
    np.testing.assert_allclose(host["losses"], xla["losses"], rtol=1e-5)


# ---------------------------------------------------------------- scripts/bench_int8_forms.py
@pytest.mark.slow  # ~14 s; tests/test_int8_kernel.py is the fast check of the kernel form
def test_every_int8_form_computes_the_same_chain():
    # The forms differ only in how the int8 product is arranged: each must give the plainly
    # dequantized chain (float rounding apart), or the benchmark compares different work.
    import jax
    import jax.numpy as jnp
    import numpy as np

    L, D, V = 2, 64, 300  # 300 rows of 64 int8 bytes: several chunks at 4 KB
    layers_f, head_f = bench_int8_forms.weights(L, D, V, jax.random.key(0))
    layers_q = [[bench_int8_forms.quantized(w) for w in ws] for ws in layers_f]
    head_q = bench_int8_forms.quantized(head_f)
    x = jax.random.normal(jax.random.key(1), (D,))
    deq = lambda q: q.q.astype(jnp.float32) * q.scale  # noqa: E731
    want = np.asarray(bench_int8_forms.chain("float32", [[deq(q) for q in ws] for ws in layers_q], deq(head_q), x))
    small = {k: (n, p, 4096, r) for k, (n, p, _, r) in bench_int8_forms.FORMS.items()}
    for form in bench_int8_forms.ORDER[1:]:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(bench_int8_forms, "FORMS", small)
            mp.setattr(bench_int8_forms.quant, "CHUNK_BYTES", 4096)
            got = np.asarray(jax.jit(lambda ls, h, x, f=form: bench_int8_forms.chain(f, ls, h, x))(layers_q, head_q, x))
        tol = 2e-2 if "bf16" in form else 1e-4  # bfloat16 activations: 8 bits of mantissa
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max(), err_msg=form)
