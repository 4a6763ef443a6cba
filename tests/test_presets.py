"""Every preset in configs/ loads, validates, and its model's train step traces on abstract
inputs (`jax.eval_shape`: shapes only, nothing allocated, so GPT-2 124M costs no memory)."""
import glob
import os
from functools import partial

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxgpt.config import build_config
from jaxgpt.train.loop import build_model
from jaxgpt.train.step import build_optimizer, init_train_state, replace_model, train_step

PRESETS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py")))


def test_there_are_presets():
    assert len(PRESETS) >= 5


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: os.path.basename(p)[:-3])
def test_preset_validates_and_its_train_step_traces(path):
    cfg = build_config(path, [])
    # the vocabulary comes from the data: GPT-2 BPE for presets reading GPT-2 data, else bytes
    vocab = 50257 if "gpt2" in os.path.basename(path) else 257
    cfg = replace_model(cfg, vocab_size=vocab)
    cfg.validate(n_devices=1)
    abstract = nnx.eval_shape(lambda: build_model(cfg, 0))
    graphdef = nnx.graphdef(abstract)
    tx = build_optimizer(cfg)
    state = jax.eval_shape(lambda: init_train_state(nnx.to_pure_dict(nnx.state(build_model(cfg, 0))), tx, 0))
    micro, T = cfg.batch_size // cfg.grad_accum, cfg.model.block_size
    batch = {"tokens": jax.ShapeDtypeStruct((cfg.grad_accum, micro, T + 1), jnp.int32),
             "mask": jax.ShapeDtypeStruct((cfg.grad_accum, micro, T), jnp.float32)}
    new_state, metrics = jax.eval_shape(
        partial(train_step, graphdef=graphdef, tx=tx, task=cfg.task, axis_name=None), state, batch)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert metrics["loss"].shape == () and metrics["finite"].dtype == jnp.bool_
