"""The `attention=` switch: every backend equals a plain reference attention, and `auto` picks
what the contract says on each platform."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import attention as attn


def _reference(q, k, v, allowed_BxTxS):
    """Textbook attention in float64 numpy-style jnp ops: softmax over the allowed keys."""
    K = q.shape[-1]
    s = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(K)
    s = jnp.where(allowed_BxTxS[:, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhts,bshk->bthk", p, v)


def _qkv(B=3, T=9, S=9, H=2, K=8, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape), jnp.float32)
            for shape in ((B, T, H, K), (B, S, H, K), (B, S, H, K))]


def _allowed(T, S, causal, lengths):
    a = np.ones((len(lengths), T, S), bool)
    if causal:
        a &= np.arange(S)[None, None, :] <= np.arange(T)[None, :, None]
    a &= np.arange(S)[None, None, :] < np.asarray(lengths)[:, None, None]
    return jnp.asarray(a)


@pytest.mark.parametrize("backend", ["xla", "cpu"])  # cpu: the plain form the cached paths use
@pytest.mark.parametrize("causal, lengths", [(True, None), (True, [9, 5, 1]), (False, [9, 4, 2])])
def test_backend_equals_reference_in_values_and_gradients(backend, causal, lengths):
    q, k, v = _qkv()
    kv_len = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    allowed = _allowed(9, 9, causal, lengths or [9, 9, 9])
    # Only real queries are compared: a padded query row (t >= length) is never read.
    rows = jnp.asarray(np.arange(9)[None, :] < np.asarray(lengths or [9] * 3)[:, None])
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32) * rows[..., None, None]

    def ours(q, k, v):
        return attn.attend(q, k, v, backend=backend, is_causal=causal, kv_lengths_B=kv_len)

    def ref(q, k, v):
        return _reference(q, k, v, allowed)

    out, vjp = jax.vjp(ours, q, k, v)
    want, vjp_ref = jax.vjp(ref, q, k, v)
    np.testing.assert_allclose(out * rows[..., None, None], want * rows[..., None, None], atol=1e-5)
    for g, g_ref in zip(vjp(cot), vjp_ref(cot)):
        np.testing.assert_allclose(g, g_ref, atol=1e-5)


def test_dense_mask_with_per_row_offsets_equals_reference():
    """What the cached paths pass: query t of row b sees cache slots <= start_b + t."""
    q, k, v = _qkv(T=4, S=12)
    start = np.array([0, 5, 8])
    mask = jnp.asarray(np.arange(12)[None, None, :] <= (start[:, None, None] + np.arange(4)[None, :, None]))
    for backend in ("xla", "cpu"):
        np.testing.assert_allclose(attn.attend(q, k, v, backend=backend, mask_BxTxS=mask),
                                   _reference(q, k, v, mask), atol=1e-5)


def test_dropout_on_probabilities_is_keyed_and_inverted():
    q, k, v = _qkv()
    args = dict(backend="xla", is_causal=True, dropout_rate=0.5)
    a = attn.attend(q, k, v, dropout_key=jax.random.key(0), **args)
    b = attn.attend(q, k, v, dropout_key=jax.random.key(1), **args)
    plain = attn.attend(q, k, v, backend="xla", is_causal=True)
    assert not np.allclose(a, b) and not np.allclose(a, plain)
    np.testing.assert_array_equal(a, attn.attend(q, k, v, dropout_key=jax.random.key(0), **args))
    # Inverted dropout keeps the expectation: over n keys the mean is within 5 standard errors
    # of the no-dropout output, for every output element.
    n = 400
    samples = jax.vmap(lambda key: attn.attend(q, k, v, dropout_key=key, **args))(
        jax.random.split(jax.random.key(2), n))
    err = np.abs(np.asarray(samples.mean(0) - plain))
    assert np.all(err <= 5 * np.asarray(samples.std(0)) / np.sqrt(n) + 1e-6), err.max()


@pytest.mark.parametrize("requested, platform, dtype, head_dim, remat, want", [
    ("auto", "cpu", "float32", 64, "none", "cpu"),
    ("auto", "cpu", "bfloat16", 64, "none", "xla"),  # the cpu kernels compute in float32
    ("auto", "cpu", "float32", 64, "full", "xla"),  # ...and keep their own residuals
    ("auto", "gpu", "bfloat16", 64, "none", "cudnn"),
    ("auto", "gpu", "bfloat16", 128, "full", "cudnn"),
    ("auto", "gpu", "float32", 64, "none", "xla"),  # cuDNN flash needs 16-bit inputs
    ("auto", "gpu", "bfloat16", 12, "none", "xla"),  # head dim not a multiple of 8
    ("auto", "gpu", "bfloat16", 256, "none", "xla"),  # head dim over 128
    ("auto", "tpu", "bfloat16", 64, "none", "xla"),
    ("xla", "cpu", "float32", 64, "none", "xla"),
    ("cpu", "cpu", "float32", 64, "none", "cpu"),
])
def test_auto_resolution(requested, platform, dtype, head_dim, remat, want):
    assert attn.resolve(requested, platform, jnp.dtype(dtype), head_dim, remat) == want


@pytest.mark.parametrize("requested, platform, dtype, remat, needle", [
    ("cudnn", "cpu", "bfloat16", "none", "needs a GPU"),
    ("cudnn", "gpu", "float32", "none", "bfloat16 or float16"),
    ("cpu", "cpu", "bfloat16", "none", "compute in float32"),
    ("cpu", "cpu", "float32", "dots", "remat=none"),
    ("flash", "cpu", "float32", "none", "must be one of"),
])
def test_an_explicit_backend_that_cannot_serve_says_why(requested, platform, dtype, remat, needle):
    with pytest.raises(ValueError, match=needle):
        attn.resolve(requested, platform, jnp.dtype(dtype), 64, remat)


@pytest.mark.gpu
def test_cudnn_equals_xla_in_bfloat16_on_gpu():
    """On a GPU: cuDNN flash attention == the XLA reference, causal and right-padded, in values
    and gradients, within bfloat16 rounding (inputs are bf16; both accumulate in float32)."""
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(B=2, T=128, S=128, H=4, K=64))
    lengths = jnp.asarray([128, 77], jnp.int32)
    rows = (jnp.arange(128)[None, :] < lengths[:, None])[..., None, None]

    def f(backend):
        def g(q, k, v):
            y = attn.attend(q, k, v, backend=backend, is_causal=True, kv_lengths_B=lengths)
            return jnp.sum(jnp.where(rows, y.astype(jnp.float32), 0) ** 2)
        return jax.jit(jax.value_and_grad(g, argnums=(0, 1, 2)))(q, k, v)

    (lx, gx), (lc, gc) = f("xla"), f("cudnn")
    np.testing.assert_allclose(float(lc), float(lx), rtol=2e-2)
    for a, b in zip(gc, gx):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(a - b) <= 3e-2 * np.linalg.norm(b) + 1e-3
