"""Model equivalences: causality, cached == full forward, rows at their own offsets, dtypes."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt.config import ModelConfig
from jaxgpt.model import abstract_model, count_params, create_model, init_cache, logical_axes

CFG = ModelConfig(vocab_size=100, block_size=32, n_layer=2, n_head=2, n_embd=32)


def _tokens(B=2, T=12, seed=0, V=100):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, T)), jnp.int32)


def test_causality_via_gradients():
    """d logits[t] / d wpe[s] is exactly zero for every later position s > t, nonzero for s <= t."""
    model = create_model(CFG, 0)
    graphdef, params = nnx.split(model)
    toks = _tokens(1, 10)

    def out_at(p, t):
        return nnx.merge(graphdef, p).logits(toks)[0, t].sum()

    for t in (0, 4, 9):
        g_wpe = np.asarray(jax.grad(out_at)(params, t)["wpe"][...])
        row_norm = np.abs(g_wpe).sum(-1)
        assert np.all(row_norm[t + 1:] == 0.0), f"position {t} sees the future"
        assert np.all(row_norm[: t + 1] > 0.0), f"position {t} ignores its past"


@pytest.mark.parametrize("attention", ["xla", pytest.param("cpu", marks=pytest.mark.slow)])
def test_cached_forward_equals_full_forward(attention):
    """prefill (7 tokens), extend (2 at once) and decode_step (one at a time) == one full pass."""
    model = create_model(CFG, 1, attention=attention)
    toks = _tokens(3, 12, seed=3)
    full = model.logits(toks)
    cache = init_cache(CFG, 3, 16)
    h, cache = model.prefill(toks[:, :7], jnp.full((3,), 7), cache)
    steps = [model.head(h)[:, None]]
    h, cache = model.extend(toks[:, 7:9], cache)
    steps.append(model.head(h))
    layers = model.layer_params()
    for t in range(9, 12):
        h, cache = model.decode_step(toks[:, t], jnp.full((3,), t), cache, layers)
        steps.append(model.head(h)[:, None])
    np.testing.assert_allclose(np.concatenate(steps, 1), full[:, 6:], atol=1e-5)
    assert cache["length"].tolist() == [12, 12, 12]


@pytest.mark.slow  # the generate tests' mixed-length batches cover per-row offsets
def test_rows_write_at_their_own_offset():
    """Two rows at different cache lengths decode exactly as each would alone."""
    model = create_model(CFG, 2)
    a, b = _tokens(1, 9, seed=5)[0], _tokens(1, 5, seed=6)[0]
    cache = init_cache(CFG, 2, 16)
    padded = jnp.stack([a[:8], jnp.concatenate([b[:4], jnp.zeros(4, jnp.int32)])])
    _, cache = model.prefill(padded, jnp.array([8, 4]), cache)
    assert cache["length"].tolist() == [8, 4]
    h, _ = model.decode_step(jnp.stack([a[8], b[4]]), jnp.array([8, 4]), cache)
    lg = model.head(h)
    np.testing.assert_allclose(lg[0], model.logits(a[None, :9])[0, 8], atol=1e-5)
    np.testing.assert_allclose(lg[1], model.logits(b[None, :5])[0, 4], atol=1e-5)


def test_every_parameter_has_logical_axes_matching_its_rank():
    cfg = ModelConfig(vocab_size=100, block_size=32, n_layer=2, n_head=2, n_embd=32, n_classes=3)
    m = create_model(cfg, 0)
    axes, params = logical_axes(m), nnx.to_pure_dict(nnx.state(m, nnx.Param))
    flat_axes = dict(jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0])
    flat_params = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    assert flat_axes.keys() == flat_params.keys()
    for path, a in flat_axes.items():
        assert len(a) == flat_params[path].ndim, (path, a)
    assert axes["blocks"]["w_qkv"] == ("layers", "embed", "qkv")
    assert axes["wte"] == ("vocab", "embed")


def test_padded_vocab_is_never_predicted():
    cfg = ModelConfig(vocab_size=70, block_size=16, n_layer=1, n_head=1, n_embd=16)
    model = create_model(cfg, 0)
    assert model.wte[...].shape[0] == 128  # padded to a multiple of 64
    logits = model.logits(_tokens(1, 5, V=70))
    assert logits.shape[-1] == 70


def test_gpt2_initialisation_scales():
    cfg = ModelConfig(vocab_size=256, block_size=64, n_layer=8, n_head=4, n_embd=256)
    m = create_model(cfg, 0)
    assert abs(float(jnp.std(m.blocks.w_qkv[...])) - 0.02) < 1e-3
    assert abs(float(jnp.std(m.blocks.w_mlp_out[...])) - 0.02 / math.sqrt(16)) < 5e-4
    assert float(jnp.abs(m.blocks.b_fc[...]).max()) == 0.0
    assert float(m.blocks.ln1_scale[...].min()) == 1.0


def test_bias_free_model_has_no_biases():
    m = create_model(ModelConfig(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=8, bias=False))
    names = {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(m))}
    assert not any("bias" in n or "/b_" in n for n in names), names


def test_gpt2_124m_param_count_without_allocating():
    cfg = ModelConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    m = abstract_model(cfg)
    # HF GPT-2 small has 124,439,808 params; the 47 padded embedding rows add 47 * 768.
    assert count_params(m, non_embedding=False) == 124_439_808 + 47 * 768


def test_jit_equals_no_jit_and_dropout_is_keyed():
    cfg = ModelConfig(vocab_size=100, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.3)
    model = create_model(cfg, 0)
    graphdef, params = nnx.split(model)
    toks = _tokens()
    f = lambda p, k: nnx.merge(graphdef, p).hidden(toks, dropout_key=k)
    eager = f(params, None)
    np.testing.assert_allclose(jax.jit(f)(params, None), eager, atol=1e-5)
    d1, d2 = jax.jit(f)(params, jax.random.key(1)), jax.jit(f)(params, jax.random.key(2))
    assert not np.allclose(d1, eager) and not np.allclose(d1, d2)
    np.testing.assert_array_equal(d1, jax.jit(f)(params, jax.random.key(1)))


def test_bfloat16_compute_stays_close_and_params_stay_float32():
    m32 = create_model(CFG, 0)
    m16 = create_model(CFG, 0, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m16)))
    a = m32.logits(_tokens())
    b = m16.logits(_tokens())
    assert b.dtype == jnp.float32
    assert float(jnp.abs(a - b).max()) < 0.1


def test_classify_reads_the_last_real_token():
    cfg = ModelConfig(vocab_size=100, block_size=16, n_layer=1, n_head=2, n_embd=16, n_classes=3)
    m = create_model(cfg, 0)
    toks = _tokens(1, 8)
    padded_a = toks.at[0, 5:].set(0)
    padded_b = toks.at[0, 5:].set(7)
    la = m.classify(padded_a, jnp.array([5]))
    lb = m.classify(padded_b, jnp.array([5]))
    np.testing.assert_allclose(la, lb, atol=1e-6)  # padding after the last token is invisible
    assert not np.allclose(la, m.classify(padded_a, jnp.array([4])))


@pytest.mark.parametrize("bad", [dict(n_embd=30, n_head=4), dict(n_layer=0), dict(dropout=1.0)])
def test_model_config_validation(bad):
    from jaxgpt.errors import UserError
    with pytest.raises(UserError):
        ModelConfig(**{**CFG.__dict__, **bad}).validate()
