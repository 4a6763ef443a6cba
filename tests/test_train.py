"""Step-level equivalences: devices, accumulation, masks, schedule, decay mask."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt.config import Config, ModelConfig
from jaxgpt.model import create_model
from jaxgpt.train import (AXIS, build_optimizer, decay_mask, init_train_state, lm_loss_sums, lr_schedule,
                          shard_batch, train_step)

MCFG = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
CFG = Config(model=MCFG, lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=10, batch_size=16)


def _setup(cfg=CFG):
    model = create_model(cfg.model, 0)
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model))
    tx = build_optimizer(cfg)
    return graphdef, tx, init_train_state(params, tx, cfg.seed)


def _batch(B=16, T=16, seed=0, ragged=True):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 64, (B, T + 1)).astype(np.int32)
    mask = np.ones((B, T), np.float32)
    if ragged:  # rows with different numbers of counted targets: a per-shard mean would be wrong
        for b in range(B):
            mask[b, rng.integers(1, T):] = 0.0
    return {"tokens": toks, "mask": mask}


def _run(state, step_fn, batches, shard):
    for b in batches:
        state, m = step_fn(state, shard(b))
    return state, m


def _allclose(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4)


def test_loss_falls_on_a_fixed_batch():
    graphdef, tx, state = _setup(Config(model=MCFG, lr=1e-2, warmup_steps=0, max_steps=10))
    step = jax.jit(partial(train_step, graphdef=graphdef, tx=tx, task="lm", axis_name=None))
    b = shard_batch(_batch(ragged=False), 1, 1)
    b = jax.tree.map(lambda x: x[0], b)
    losses = []
    for _ in range(8):
        state, m = step(state, b)
        losses.append(float(m["loss"]))
    assert losses[0] > np.log(64) - 0.3  # starts near uniform
    assert losses[-1] < losses[0] - 0.5, losses


def test_pmap_8_devices_equals_1_device():
    assert jax.local_device_count() == 8
    graphdef, tx, state = _setup()
    batches = [_batch(seed=s) for s in range(3)]
    one = jax.jit(partial(train_step, graphdef=graphdef, tx=tx, task="lm", axis_name=None))
    s1, m1 = _run(state, one, batches, lambda b: jax.tree.map(lambda x: x[None], b))
    pm = jax.pmap(partial(train_step, graphdef=graphdef, tx=tx, task="lm"), axis_name=AXIS)
    rep = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (8, *np.shape(x))), state)
    s8, m8 = _run(rep, pm, batches, lambda b: shard_batch(b, 8, 1))
    _allclose(s1["params"], jax.tree.map(lambda x: x[0], s8["params"]), atol=1e-5)
    np.testing.assert_allclose(float(m1["loss"]), float(m8["loss"][0]), rtol=1e-5)
    # every device holds the same replica
    _allclose(jax.tree.map(lambda x: x[0], s8["params"]), jax.tree.map(lambda x: x[7], s8["params"]), 0)


def test_grad_accumulation_equals_one_large_batch():
    graphdef, tx, state = _setup()
    step = jax.jit(partial(train_step, graphdef=graphdef, tx=tx, task="lm", axis_name=None))
    batches = [_batch(seed=10 + s) for s in range(3)]
    s_big, m_big = _run(state, step, batches, lambda b: jax.tree.map(lambda x: x[None], b))
    s_acc, m_acc = _run(state, step, batches, lambda b: jax.tree.map(lambda x: x[0], shard_batch(b, 1, 4)))
    _allclose(s_big["params"], s_acc["params"], atol=1e-5)
    np.testing.assert_allclose(float(m_big["loss"]), float(m_acc["loss"]), rtol=1e-5)


def test_masked_targets_do_not_affect_the_loss():
    graphdef, _, state = _setup()
    b = _batch(seed=3)
    s1, n1, _ = lm_loss_sums(graphdef, state["params"], b, None)
    # change every masked-out target token; the loss must not move
    toks = b["tokens"].copy()
    targets = toks[:, 1:]
    targets[b["mask"] == 0] = (targets[b["mask"] == 0] + 1) % 64
    s2, n2, _ = lm_loss_sums(graphdef, state["params"], {"tokens": toks, "mask": b["mask"]}, None)
    assert float(n1) == float(b["mask"].sum()) == float(n2)
    np.testing.assert_allclose(float(s1), float(s2), rtol=1e-6)
    # and a counted target does move it
    toks[0, 1] = (toks[0, 1] + 1) % 64
    s3, _, _ = lm_loss_sums(graphdef, state["params"], {"tokens": toks, "mask": b["mask"]}, None)
    assert abs(float(s3) - float(s1)) > 1e-4


def test_weight_decay_mask_covers_matrices_and_embeddings_only():
    model = create_model(MCFG, 0)
    flat = jax.tree_util.tree_flatten_with_path(decay_mask(nnx.to_pure_dict(nnx.state(model))))[0]
    decayed = {"/".join(str(p.key) for p in path) for path, v in flat if v}
    assert decayed == {"wte", "wpe", "blocks/w_qkv", "blocks/w_attn_out", "blocks/w_fc", "blocks/w_mlp_out"}


def test_weight_decay_is_applied_only_where_masked():
    cfg = Config(model=MCFG, lr=1e-2, weight_decay=0.5, warmup_steps=0, grad_clip=0.0)
    tx = build_optimizer(cfg)
    params = {"wte": jnp.ones((2, 2)), "blocks": {"b_fc": jnp.ones((2, 2)), "ln1_scale": jnp.ones((2, 2))}}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    assert float(jnp.abs(updates["wte"]).max()) > 0  # decayed even with zero gradient
    assert float(jnp.abs(updates["blocks"]["b_fc"]).max()) == 0
    assert float(jnp.abs(updates["blocks"]["ln1_scale"]).max()) == 0


def test_schedule_values_at_known_steps():
    cfg = Config(lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=2000, decay_steps=1000)
    s = lr_schedule(cfg)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(50)), 5e-4, rtol=1e-5)
    np.testing.assert_allclose(float(s(100)), 1e-3, rtol=1e-5)
    mid = 100 + (1000 - 100) // 2  # half way through the cosine: the mean of lr and min_lr
    np.testing.assert_allclose(float(s(mid)), 5.5e-4, rtol=1e-4)
    np.testing.assert_allclose(float(s(1000)), 1e-4, rtol=1e-5)
    np.testing.assert_allclose(float(s(1999)), 1e-4, rtol=1e-5)  # held after decay_steps


def test_grad_clipping_bounds_the_update_norm():
    cfg = Config(model=MCFG, grad_clip=1e-3, lr=1.0, warmup_steps=0, weight_decay=0.0)
    graphdef, tx, state = _setup(cfg)
    step = jax.jit(partial(train_step, graphdef=graphdef, tx=tx, task="lm", axis_name=None))
    _, m = step(state, jax.tree.map(lambda x: x[None], _batch()))
    assert float(m["grad_norm"]) > 1e-3  # the reported norm is before clipping
