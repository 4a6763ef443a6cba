"""bfloat16, dropout and remat on the reference path: each against float32 / autodiff / none.

Tolerances for bfloat16. bf16 keeps 8 significant bits, so each rounding of an operand is off
by at most 2^-9 ~ 0.2% relative. A 2-layer block stack rounds its activations and weights
before ~a dozen matmuls between the embedding and the loss, and the backward again; errors of
independent roundings add roughly in quadrature, so the gradient as a whole should differ from
the float32 one by a few tenths of a percent up to ~2%. We allow 5% of the float32 gradient's
norm (a broken bf16 path — a missing float32 softmax, bf16 LayerNorm statistics, a gradient in
the wrong dtype — lands far outside it) and require each leaf's cosine similarity to stay above
0.99. Logits: float32 LayerNorm/softmax keep them within ~0.05 absolute at this scale.
"""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt import loss
from jaxgpt.config import Config, ModelConfig
from jaxgpt.generation import generate
from jaxgpt.model import create_model, init_cache
from jaxgpt.train.step import build_optimizer, init_train_state, train_step

MCFG = ModelConfig(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=32)
BF16_GRAD_REL = 0.05


def _model(dtype, attention="xla", remat="none", cfg=MCFG, seed=0):
    return create_model(cfg, seed, dtype, attention, remat)


def _batch(B=8, T=32, seed=0, V=96):
    rng = np.random.default_rng(seed)
    return {"tokens": jnp.asarray(rng.integers(0, V, (B, T + 1)), jnp.int32),
            "mask": jnp.ones((B, T), jnp.float32)}


def _loss_and_grads(model, batch, key=None):
    graphdef, params = nnx.split(model)
    f = lambda p: loss.lm_loss_sums(nnx.merge(graphdef, p), batch, key)[0]  # noqa: E731
    return jax.jit(jax.value_and_grad(f))(params)


def _global_rel(a, b):
    da = jnp.sqrt(sum(jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
    nb = jnp.sqrt(sum(jnp.sum(y ** 2) for y in jax.tree.leaves(b)))
    return float(da / nb)


def test_bfloat16_gradients_match_float32():
    batch = _batch()
    l32, g32 = _loss_and_grads(_model("float32"), batch)
    l16, g16 = _loss_and_grads(_model("bfloat16"), batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g16))  # params stay float32
    assert abs(float(l16) - float(l32)) <= 0.01 * float(l32)
    assert _global_rel(g16, g32) <= BF16_GRAD_REL
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
        a, b = np.ravel(a), np.ravel(b)
        if np.linalg.norm(b) > 1e-6:
            assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99


def test_thirty_bfloat16_steps_track_the_float32_loss_curve():
    """Same init, same fixed batch: the bf16 curve stays within 3% (relative) of float32's at
    every step, while float32's falls by ~25% (so the bound is not vacuous)."""
    cfg = Config(model=MCFG, lr=3e-3, warmup_steps=0, max_steps=30, batch_size=8)
    batch = jax.tree.map(lambda x: x[None], _batch())  # one micro-batch
    curves = {}
    for dtype in ("float32", "bfloat16"):
        model = _model(dtype)
        graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model))
        tx = build_optimizer(cfg)
        state = init_train_state(params, tx, cfg.seed)
        step = jax.jit(partial(train_step, graphdef=graphdef, tx=tx, task="lm", axis_name=None))
        curve = []
        for _ in range(30):
            state, m = step(state, batch)
            curve.append(float(m["loss"]))
        curves[dtype] = np.array(curve)
    f32, b16 = curves["float32"], curves["bfloat16"]
    assert f32[-1] < 0.8 * f32[0]
    np.testing.assert_array_less(np.abs(b16 - f32), 0.03 * f32)


def test_dropout_backward_matches_a_finite_difference():
    """With dropout 0.1 and a fixed dropout key, <grad, d> equals the central difference of the
    loss along a random unit direction d. In float32 the loss sum (~600 here) carries rounding
    of ~1e-4 absolute, so the step is large (0.1: rounding / (2 step) ~ 1e-3) while the
    truncation error, O(step^2 * third derivative), measured ~2e-4 relative at this step."""
    cfg = ModelConfig(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
    model = _model("float32", cfg=cfg)
    batch, key = _batch(B=4), jax.random.key(7)
    graphdef, params = nnx.split(model)
    f = jax.jit(lambda p: loss.lm_loss_sums(nnx.merge(graphdef, p), batch, key)[0])
    g = jax.jit(jax.grad(lambda p: loss.lm_loss_sums(nnx.merge(graphdef, p), batch, key)[0]))(params)
    rng = np.random.default_rng(3)
    d = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    dn = jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(d)))
    d = jax.tree.map(lambda x: x / dn, d)
    eps = 0.1
    plus = f(jax.tree.map(lambda p, u: p + eps * u, params, d))
    minus = f(jax.tree.map(lambda p, u: p - eps * u, params, d))
    fd = (float(plus) - float(minus)) / (2 * eps)
    analytic = float(sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(d))))
    assert abs(fd - analytic) <= 5e-3 * abs(analytic) + 2e-3, (fd, analytic)
    assert abs(analytic) > 0.05  # a direction along which the loss really moves
    # the dropout is really on: another key gives another loss
    assert float(f(params)) != float(jax.jit(lambda p: loss.lm_loss_sums(
        nnx.merge(graphdef, p), batch, jax.random.key(8))[0])(params))


@pytest.mark.parametrize("remat", [pytest.param("dots", marks=pytest.mark.slow), "full"])
def test_every_remat_setting_gives_the_loss_and_gradients_of_none(remat):
    cfg = ModelConfig(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
    batch, key = _batch(), jax.random.key(3)  # with dropout: the recompute must redraw the same masks
    l0, g0 = _loss_and_grads(_model("float32", cfg=cfg), batch, key)
    l1, g1 = _loss_and_grads(_model("float32", remat=remat, cfg=cfg), batch, key)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_remat_lowers_the_step_memory_on_a_small_shape():
    """bench_memory's measurement (compiled memory_analysis, nothing allocated) at a small shape:
    remat=full stores a fraction of what remat=none stores."""
    import sys
    sys.path.insert(0, "scripts")
    from bench_memory import step_memory
    cfg = ModelConfig(vocab_size=512, block_size=256, n_layer=4, n_head=4, n_embd=64)
    none = step_memory(cfg, 8, "bfloat16", "none")["temp_bytes"]
    full = step_memory(cfg, 8, "bfloat16", "full")["temp_bytes"]
    assert none >= 3 * full, (none, full)


# ---------------------------------------------------------------- bfloat16 generation
BF16_LOGIT_TOL = 0.05  # cached vs full forward differ only in rounding order of bf16 products


@pytest.fixture(scope="module")
def bf16_model():
    return _model("bfloat16", attention="auto", seed=4)


def _prompts(lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, MCFG.vocab_size, n).tolist() for n in lengths]


def test_bfloat16_prefill_and_decode_equal_the_bfloat16_full_forward(bf16_model):
    m = bf16_model
    assert m.dtype == jnp.bfloat16
    toks = jnp.asarray(_prompts([20])[0])[None]
    full = np.asarray(m.logits(toks))[0]
    cache = init_cache(MCFG, 1, 32, jnp.bfloat16)
    h, cache = m.prefill(toks[:, :8], jnp.array([8]), cache)
    assert cache["k"][0].dtype == jnp.bfloat16
    got = [np.asarray(m.head(h))[0]]
    for t in range(8, 20):
        h, cache = m.decode_step(toks[:, t], jnp.array([t]), cache)
        got.append(np.asarray(m.head(h))[0])
    np.testing.assert_allclose(np.stack(got), full[7:], atol=BF16_LOGIT_TOL)


def test_bfloat16_greedy_equals_full_recompute_where_the_top2_gap_is_clear(bf16_model):
    m = bf16_model
    full = jax.jit(m.logits)  # one shape: sequences right-padded to block_size (causal: inert)
    compared = 0
    for p in _prompts([3, 9, 14], seed=2):
        out = generate(m, [p], 10, temperature=0)[0]
        seq = list(p)
        for tok in out:
            lg = np.asarray(full(jnp.asarray([seq + [0] * (MCFG.block_size - len(seq))])))[0, len(seq) - 1]
            top2 = np.sort(lg)[-2:]
            if top2[1] - top2[0] <= 2 * BF16_LOGIT_TOL:
                break  # a near-tie: two correct bf16 programs may pick either; stop comparing
            assert tok == int(lg.argmax())
            compared += 1
            seq.append(tok)
    assert compared >= 10


def test_bfloat16_batched_equals_single(bf16_model):
    prompts = _prompts([5, 12, 3, 9], seed=5)
    batched = generate(bf16_model, prompts, 8, temperature=0)
    for p, got in zip(prompts, batched):
        assert generate(bf16_model, [p], 8, temperature=0)[0] == got
