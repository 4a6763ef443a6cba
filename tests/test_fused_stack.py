"""fused_stack.stack (hand-written backward) == the layers of model._block under autodiff."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import fused_stack
from jaxgpt.config import ModelConfig
from jaxgpt.model import _block, create_model
from flax import nnx


def _blocks(cfg, seed):
    """Stacked block params with every tensor non-trivial (LayerNorm scales != 1, biases != 0)."""
    state = nnx.to_pure_dict(nnx.state(create_model(cfg, seed).blocks))
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(np.asarray(v) + 0.05 * rng.standard_normal(v.shape), jnp.float32)
            for k, v in state.items()}


def _reference(cfg, blocks, x_BxTxD, allowed_BxTxS):
    for i in range(cfg.n_layer):
        p = {k: v[i] for k, v in blocks.items()}
        x_BxTxD, _ = _block(cfg, jnp.float32, p, x_BxTxD, allowed_BxTxS, None, None, None)
    return x_BxTxD


def _causal(B, T):
    return jnp.broadcast_to(jnp.arange(T)[None, :] <= jnp.arange(T)[:, None], (B, T, T))


@pytest.mark.parametrize("bias, T, chunk, masked", [
    (False, 12, 5, False),  # three query chunks, the last one ragged; no biases anywhere
    (True, 7, 64, False),   # one chunk
    (True, 10, 3, True),    # a caller's mask: one chunk whatever _chunk_len says
])
def test_values_and_gradients_match_autodiff_of_block(monkeypatch, bias, T, chunk, masked):
    monkeypatch.setattr(fused_stack, "_chunk_len", lambda T_: min(chunk, T_))
    cfg = ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=bias)
    B = 3
    blocks = _blocks(cfg, 0)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((B, T, 16)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((B, T, 16)), jnp.float32)
    allowed = _causal(B, T)
    mask = None
    if masked:  # row 0 hides its first 4 keys: its first queries see no key at all
        keys = np.ones((B, T), bool)
        keys[0, :4] = False
        keys[2, 5] = False
        allowed = allowed & jnp.asarray(keys)[:, None, :]
        mask = allowed

    ref, ref_vjp = jax.vjp(lambda b, x: _reference(cfg, b, x, allowed), blocks, x)
    out, vjp = jax.vjp(lambda b, x: fused_stack.stack(b, x, mask, cfg.n_head), blocks, x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    (g_ref_b, g_ref_x), (g_b, g_x) = ref_vjp(cot), vjp(cot)
    np.testing.assert_allclose(g_x, g_ref_x, rtol=1e-4, atol=1e-5)
    assert set(g_b) == set(g_ref_b)
    for k in g_ref_b:
        np.testing.assert_allclose(g_b[k], g_ref_b[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_jit_matches_eager_and_first_tokens_ignore_later_ones():
    """Under jit too; and the output at t does not move when tokens after t change."""
    cfg = ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)
    blocks = _blocks(cfg, 2)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 11, 16)), jnp.float32)
    f = jax.jit(lambda b, x: fused_stack.stack(b, x, None, 2))
    eager = fused_stack.stack(blocks, x, None, 2)
    np.testing.assert_allclose(f(blocks, x), eager, rtol=1e-5, atol=1e-6)
    changed = x.at[:, 6:].add(1.0)
    np.testing.assert_allclose(f(blocks, changed)[:, :6], eager[:, :6], rtol=1e-5, atol=1e-6)
    assert not np.allclose(f(blocks, changed)[:, 6:], eager[:, 6:])
