"""The `cpu` backend's kernels == the reference path, in float32, in values and gradients.

The reference is the model's own `lax.scan` of `_block` with attention=xla (plain autodiff);
the kernels are jaxgpt/kernels/: the stack with its hand-written backward and chunked causal
attention, the fused head loss, and the head-major one-token decode.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxgpt import loss
from jaxgpt.config import ModelConfig
from jaxgpt.kernels import cpu_decode, cpu_loss, cpu_stack
from jaxgpt.model import create_model, init_cache


def _noisy(model, seed):
    """Every tensor non-trivial (LayerNorm scales != 1, biases != 0): a swapped or dropped
    term shows in the comparison."""
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda v: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32), params)
    return nnx.merge(graphdef, params)


def _pair(cfg, seed=0):
    ref = _noisy(create_model(cfg, seed, attention="xla"), seed)
    cpu = nnx.merge(nnx.graphdef(create_model(cfg, seed, attention="cpu")), nnx.state(ref))
    assert (ref.attention, cpu.attention) == ("xla", "cpu")
    return ref, cpu


@pytest.mark.parametrize("bias, T", [(True, 130), pytest.param(False, 128, marks=pytest.mark.slow)])  # 3 query chunks (ragged), 2
def test_stack_and_loss_equal_the_reference_in_values_and_gradients(bias, T):
    cfg = ModelConfig(vocab_size=67, block_size=T, n_layer=2, n_head=2, n_embd=16, bias=bias)
    ref, cpu = _pair(cfg)
    rng = np.random.default_rng(1)
    batch = {"tokens": jnp.asarray(rng.integers(0, 67, (2, T + 1)), jnp.int32),
             "mask": jnp.asarray(rng.integers(0, 2, (2, T)), jnp.float32)}

    def value_and_grads(model):
        graphdef, params = nnx.split(model)
        f = lambda p: loss.lm_loss_sums(nnx.merge(graphdef, p), batch, None)[0]  # noqa: E731
        return jax.jit(jax.value_and_grad(f))(params)

    (l_ref, g_ref), (l_cpu, g_cpu) = value_and_grads(ref), value_and_grads(cpu)
    np.testing.assert_allclose(l_cpu, l_ref, rtol=1e-5)
    for path, a in jax.tree_util.tree_flatten_with_path(g_ref)[0]:
        b = dict(jax.tree_util.tree_flatten_with_path(g_cpu)[0])[path]
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))
    np.testing.assert_allclose(cpu.hidden(batch["tokens"][:, :-1]), ref.hidden(batch["tokens"][:, :-1]),
                               atol=1e-5)


@pytest.mark.parametrize("chunk", [5, 64])  # several ragged query chunks; one chunk
def test_stack_chunking_is_exact_for_any_chunk_length(monkeypatch, chunk):
    monkeypatch.setattr(cpu_stack, "_chunk_len", lambda T_: min(chunk, T_))
    cfg = ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)
    ref, cpu = _pair(cfg, seed=2)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((3, 12, 16)), jnp.float32)
    cot = jnp.asarray(np.random.default_rng(4).standard_normal((3, 12, 16)), jnp.float32)
    blocks = ref._blocks()

    def reference(b, x):
        def body(h, p):
            return ref_block(p, h), None
        return jax.lax.scan(body, x, b)[0]

    from jaxgpt.model import _block
    from jaxgpt import attention as attn

    def ref_block(p, h):
        return _block(cfg, jnp.float32, p, h, lambda q, k, v, _: (attn.attend(
            q, k, v, backend="xla", is_causal=True), None), None)[0]

    want, vjp_ref = jax.vjp(reference, blocks, x)
    got, vjp_cpu = jax.vjp(lambda b, x: cpu_stack.stack(b, x, cfg.n_head), blocks, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    (gb_ref, gx_ref), (gb, gx) = vjp_ref(cot), vjp_cpu(cot)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-5)
    for k in gb_ref:
        np.testing.assert_allclose(gb[k], gb_ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # causal: the output at t does not move when inputs after t change
    changed = x.at[:, 6:].add(1.0)
    np.testing.assert_allclose(cpu_stack.stack(blocks, changed, 2)[:, :6], got[:, :6], atol=1e-6)


def _plain_loss(h_NxD, wte_VpxD, targets_N, mask_N, V):
    logits = jnp.einsum("nd,vd->nv", h_NxD, wte_VpxD)[:, :V]
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets_N) * mask_N)


@pytest.mark.parametrize("V, Vp", [(50, 64), (64, 64)])  # padded vocabulary, and none
def test_head_losses_equal_the_plain_loss_and_its_gradients(monkeypatch, V, Vp):
    """The cpu kernel's fused head loss and the chunked reference (forced to 4 chunks of 8
    tokens, the last one padded) both equal autodiff of the plain head + cross-entropy."""
    monkeypatch.setattr(loss, "CHUNK_BYTES", 8 * 4 * Vp)
    assert loss.chunk_tokens(27, Vp) == 8
    rng = np.random.default_rng(0)
    N, D = 27, 16
    h = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
    wte = jnp.asarray(rng.standard_normal((Vp, D)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, N), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, N), jnp.float32)  # half the targets do not count
    want, (wh, ww) = jax.value_and_grad(_plain_loss, argnums=(0, 1))(h, wte, targets, mask, V)
    for fn in (cpu_loss.head_loss_sum, loss.head_loss_sum):
        got, (gh, gw) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)), static_argnums=4)(
            h, wte, targets, mask, V)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        np.testing.assert_allclose(gh, wh, atol=1e-5)
        np.testing.assert_allclose(gw, ww, atol=1e-5)
        assert float(jnp.abs(gw[V:]).max(initial=0.0)) == 0.0  # padded ids get no gradient
        assert float(jnp.abs(gh[mask == 0]).max()) == 0.0  # uncounted targets neither
        g2 = jax.grad(lambda h: 3.0 * fn(h, wte, targets, mask, V))(h)  # cotangent scale applied
        np.testing.assert_allclose(g2, 3.0 * wh, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 4])  # one row: (B, D) form; more: transposed (D, B) form
def test_head_major_decode_step_equals_the_reference_step(rows):
    cfg = ModelConfig(vocab_size=67, block_size=32, n_layer=2, n_head=2, n_embd=32)
    ref, cpu = _pair(cfg, seed=5)
    rng = np.random.default_rng(6)
    lengths = jnp.asarray(rng.integers(1, 10, rows), jnp.int32)
    toks = jnp.asarray(rng.integers(0, 67, (rows, 10)), jnp.int32)
    _, cache = ref.prefill(toks, lengths, init_cache(cfg, rows, 16))
    token, pos = jnp.asarray(rng.integers(0, 67, rows), jnp.int32), lengths
    h_ref, c_ref = ref.decode_step(token, pos, cache)
    weights = cpu_decode.prepare(cpu.layer_params(), cpu.wte[...], rows, cpu.dtype)
    h_cpu, c_hm = cpu_decode.decode_step(cpu, token, pos, cpu_decode.to_head_major(cache), weights)
    c_cpu = cpu_decode.from_head_major(c_hm)
    np.testing.assert_allclose(h_cpu, h_ref, atol=1e-5)
    logits, greedy = cpu_decode.head(cpu, h_cpu, weights)
    np.testing.assert_allclose(logits, ref.head(h_ref), atol=1e-5)
    if greedy is not None:
        assert greedy.tolist() == np.asarray(ref.head(h_ref)).argmax(-1).tolist()
    for a, b in zip(jax.tree.leaves(c_cpu), jax.tree.leaves(c_ref)):
        np.testing.assert_allclose(a, b, atol=1e-6)
