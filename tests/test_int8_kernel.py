"""The int8 product kernel (jaxgpt/kernels/int8_matmul.cc, through jaxgpt/kernels/int8.py)
against XLA's own chunked product (jaxgpt/quant.py), which is the reference path: the same
values within float32 summation error, at the row counts decode and speculative verification
use, for its AVX-512 loop and its portable one; and decode with it equals decode without it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt import generation as G
from jaxgpt import quant
from jaxgpt.config import ModelConfig
from jaxgpt.errors import UserError
from jaxgpt.kernels import int8 as K
from jaxgpt.model import create_model

F32_EPS = float(np.finfo(np.float32).eps)


def test_the_kernel_is_built():
    # `pip install -e .` builds it (setup.py); CI installs that way, so a build that silently
    # failed would otherwise leave every test below to the XLA path.
    assert K.available(), f"{K.library_path()}: the int8 kernel was not built or did not load"


@pytest.mark.parametrize("choice", ["kernel", "generic"])
@pytest.mark.parametrize("O,I,B", [(1, 16, 1), (5, 37, 1), (130, 100, 3), (257, 64, 5),
                                   (64, 200, 8), (70, 48, 9), (3000, 96, 16), (2, 15, 2)])
def test_kernel_equals_xla_product(choice, O, I, B):
    """Shapes off every multiple the kernel tiles by (16 lanes, 4x unrolling, 8 rows of x per
    pass, one block per thread), so its tails run; 3000 rows split over both threads."""
    rng = np.random.default_rng(O * 1000 + I + B)
    qa = quant.quantize(jnp.asarray(rng.standard_normal((O, I)), jnp.float32), 1)
    qa = quant.QArray(qa.q, qa.scale, choice)
    x_IxB = jnp.asarray(rng.standard_normal((I, B)), jnp.float32)
    want = np.asarray(quant._out_in_product(qa.q, x_IxB, jnp.float32) * qa.scale, np.float64)
    got = np.asarray(jax.jit(lambda w, x: quant.matmul_T(w, x, jnp.float32))(qa, x_IxB), np.float64)
    exact = (np.asarray(qa.q, np.float64) @ np.asarray(x_IxB, np.float64)) * np.asarray(qa.scale, np.float64)
    # Both sum I float32 products in their own orders: each is within ~I * eps * sum|terms| of
    # the exact value (a loose form of the summation bound), so they are within twice that.
    mag = (np.abs(np.asarray(qa.q, np.float64)) @ np.abs(np.asarray(x_IxB, np.float64))) * np.asarray(qa.scale)
    bound = 2 * I * F32_EPS * mag + 1e-30
    assert (np.abs(got - want) <= bound).all()
    assert (np.abs(got - exact) <= bound / 2).all()
    assert np.abs(got - exact).max() <= 1e-5 * np.abs(exact).max()  # in practice far tighter


def test_the_kernel_is_what_decode_calls():
    """A CPU decode loop over int8 weights calls the kernel for every matrix and the head, and
    converts no whole int8 matrix; a model quantized with kernel='xla' does not call it."""
    # Not test_quant's decode model: a jitted loop traced here with these shapes and the default
    # chunk size would be reused there, where the chunk size is patched at trace time.
    cfg = ModelConfig(vocab_size=400, block_size=32, n_layer=2, n_head=2, n_embd=64)
    base = create_model(cfg, 0, attention="cpu")
    for choice, calls in (("auto", 2 * 4 + 1), ("xla", 0)):
        model = quant.quantize_model(base, kernel=choice)
        graphdef, params = nnx.split(model)
        B = 1
        weights = G.decode_weights(graphdef, params, B)
        state = _state(model, B)
        hlo = G.engine._decode_loop.lower(graphdef, params, weights, state, 4).compile().as_text()
        assert hlo.count(f'custom_call_target="{K.TARGET}"') == calls, choice


def _state(model, B, T=8):
    from jaxgpt.generation.sampling import SamplingFlags, SamplingParams
    from jaxgpt.model import init_cache

    graphdef, params = nnx.split(model)
    tokens, lengths = jnp.ones((B, T), jnp.int32), jnp.full((B,), T, jnp.int32)
    logits0, cache = G.prefill(graphdef, params, tokens, lengths, init_cache(model.cfg, B, 32))
    state, _ = G.init_decode_state(
        logits0, cache, tokens, lengths, jnp.full((B,), 4), jnp.full((B,), -1), jnp.arange(B),
        jax.random.key(0), SamplingParams.make(B, 0.0), flags=SamplingFlags(sample=False),
        windowed=False, history_len=1)
    return state


@pytest.mark.slow  # ~16 s each: the product tests above are the fast check of the same kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_generation_with_the_kernel_equals_generation_without(dtype):
    """Greedy decode, one row and three rows of mixed lengths, plus a speculative verify (a few
    rows of the target at once): the same tokens with the kernel as with XLA's products. The
    random model's logits are spread wide enough (scaled embeddings) that the last-bit
    differences of the two summation orders cannot flip an argmax. bfloat16 runs the xla
    backend (the cpu one is float32 only), whose decode calls the kernel for the LM head."""
    attention = "cpu" if dtype == "float32" else "xla"
    cfg = ModelConfig(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_embd=64)
    base = create_model(cfg, 1, attention=attention, dtype=dtype)
    base.wte[...] = base.wte[...] * 8
    prompts = [[5, 17, 33, 2], [9] * 11, [1, 2, 3, 4, 5, 6, 7]]
    out = {}
    for choice in ("xla", "kernel"):
        m = quant.quantize_model(base, kernel=choice)
        draft = quant.quantize_model(create_model(ModelConfig(**dict(vars(cfg), n_layer=1)), 2,
                                                  attention=attention, dtype=dtype), kernel=choice)
        out[choice] = (G.generate(m, prompts[:1], 12, temperature=0), G.generate(m, prompts, 12, temperature=0),
                       G.generate(m, prompts, 12, temperature=0, draft=draft, num_draft=3))
    assert out["kernel"] == out["xla"]
    assert out["xla"][1] == out["xla"][2]  # speculative == plain greedy, as everywhere


def test_an_unknown_or_unbuilt_choice_is_a_one_line_error(monkeypatch):
    model = create_model(ModelConfig(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=16), 0)
    with pytest.raises(UserError, match="unknown int8 kernel 'fast'"):
        quant.quantize_model(model, kernel="fast")
    monkeypatch.setenv(K.ENV, "nope")
    with pytest.raises(UserError, match="JAXGPT_INT8_KERNEL"):
        quant.quantize_model(model)
    monkeypatch.setenv(K.ENV, "xla")
    assert {w.kernel for w in jax.tree.leaves(nnx.state(quant.quantize_model(model)), is_leaf=quant.is_quantized)
            if quant.is_quantized(w)} == {"xla"}
    monkeypatch.setattr(K, "available", lambda: False)  # an install that could not build it
    with pytest.raises(UserError, match="was not built"):
        quant.quantize_model(model, kernel="kernel")
    assert not K.use_kernel("auto")  # auto falls back to XLA's products
