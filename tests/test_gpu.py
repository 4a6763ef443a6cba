"""On a GPU (scripts/device_check.sh runs these with JAX_PLATFORMS=cuda; elsewhere they skip):
the bf16 train step on the default (cuDNN) backend against float32 on XLA, and generation
exactness. Tolerances as in tests/test_precision.py, whose docstring justifies them; float32 on
a GPU may run its matmuls in TF32 (10 mantissa bits), hence 1e-2 rather than CPU's 1e-5."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt import loss
from jaxgpt.config import ModelConfig
from jaxgpt.generation import generate
from jaxgpt.model import create_model, init_cache

pytestmark = pytest.mark.gpu
CFG = ModelConfig(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=256)  # head dim 64


def _grads(model, batch):
    graphdef, params = nnx.split(model)
    f = lambda p: loss.lm_loss_sums(nnx.merge(graphdef, p), batch, None)[0]  # noqa: E731
    return jax.jit(jax.value_and_grad(f))(params)


def test_default_gpu_model_is_bfloat16_on_cudnn():
    m = create_model(CFG, 0)  # dtype and attention default to auto
    assert (m.dtype, m.attention) == (jnp.bfloat16, "cudnn")


def test_bfloat16_cudnn_train_gradients_match_float32_xla():
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(0, 512, (4, 129)), jnp.int32), "mask": jnp.ones((4, 128))}
    l32, g32 = _grads(create_model(CFG, 0, "float32", "xla"), batch)
    l16, g16 = _grads(create_model(CFG, 0, "bfloat16", "cudnn"), batch)
    assert abs(float(l16) - float(l32)) <= 0.01 * float(l32)
    num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)))
    den = sum(float(jnp.sum(b ** 2)) for b in jax.tree.leaves(g32))
    assert (num / den) ** 0.5 <= 0.05


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 0.05), ("float32", 1e-2)])
def test_cached_decode_equals_full_forward_on_gpu(dtype, tol):
    m = create_model(CFG, 1, dtype)
    toks = jnp.asarray(np.random.default_rng(2).integers(0, 512, (3, 40)), jnp.int32)
    full = np.asarray(m.logits(toks))
    h, cache = m.prefill(toks[:, :16], jnp.full((3,), 16), init_cache(CFG, 3, 48, m.dtype))
    got = [np.asarray(m.head(h))]
    layers = m.layer_params()
    step = jax.jit(lambda t, p, c: m.decode_step(t, p, c, layers))
    for t in range(16, 40):
        h, cache = step(toks[:, t], jnp.full((3,), t), cache)
        got.append(np.asarray(m.head(h)))
    np.testing.assert_allclose(np.stack(got, 1), full[:, 15:], atol=tol)


def test_batched_greedy_equals_single_on_gpu():
    m = create_model(CFG, 3)
    rng = np.random.RandomState(4)
    prompts = [rng.randint(0, 512, n).tolist() for n in (5, 17, 9, 30)]
    batched = generate(m, prompts, 16, temperature=0)
    for p, got in zip(prompts, batched):
        assert generate(m, [p], 16, temperature=0)[0] == got
