"""The `attention=` switch: which kernel computes softmax(q k^T / sqrt(K)) v.

Shapes in names: B batch, T queries, S keys, H heads, K head dim.

Backends (config key `attention`, resolved once per model by `resolve`):
- `xla`: `jax.nn.dot_product_attention(implementation="xla")`, the reference path. It runs on
  every platform and materialises the (B, H, T, S) scores in float32.
- `cudnn`: the same call with `implementation="cudnn"`: cuDNN's fused flash attention on NVIDIA
  GPUs. It needs a 16-bit compute dtype and a head dim that is a multiple of 8, at most 128.
  Causality and right padding reach it as `is_causal` and sequence lengths, never as a dense
  mask, so it skips the masked blocks instead of computing and discarding them.
- `cpu`: the hand-written CPU kernels in `jaxgpt/kernels/` (a whole-stack forward with a
  hand-written backward, a fused head loss, a head-major decode). They are selected by the
  model (see `GPT.hidden`), not here; inside a cached forward the `cpu` backend attends with
  the plain einsum form below, which XLA:CPU runs as fast as anything it has.
- `auto`: cudnn on a GPU when the dtype and head size allow it, cpu on CPU, xla elsewhere (TPU,
  or a GPU where cuDNN cannot serve).

Dropout on the attention probabilities exists only in the plain form (`_plain`): neither fused
kernel has it. A training forward with model.dropout > 0 therefore attends with `_plain` on
every backend; `resolve` says so in its note, and the trainer prints that note.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "xla", "cudnn", "cpu")
_NEG = -1e30  # finite "minus infinity": a row with every key masked gets uniform weights, not NaN


def cudnn_blocker(dtype, head_dim: int) -> str | None:
    """Why cuDNN flash attention cannot serve this model, or None if it can."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"it needs bfloat16 or float16 compute, not {jnp.dtype(dtype).name}"
    if head_dim % 8 or head_dim > 128:
        return f"it needs a head dim that is a multiple of 8 and at most 128, not {head_dim}"
    return None


def resolve(requested: str, platform: str, dtype, head_dim: int, remat: str = "none") -> str:
    """The concrete backend ("xla" | "cudnn" | "cpu") for a requested one on `platform`.

    `auto` takes the fastest backend that can serve the model: cudnn on a GPU when cuDNN takes
    the dtype and head size; on CPU the cpu kernels when they apply (float32 compute, remat=none:
    they compute in float32 and store exactly the residuals their hand-written backward needs);
    xla otherwise. An explicit choice that cannot serve raises ValueError naming why (the CLI
    turns it into a one-line error).
    """
    if requested not in BACKENDS:
        raise ValueError(f"attention must be one of {list(BACKENDS)}, got {requested!r}")
    blocker = cudnn_blocker(dtype, head_dim)
    cpu_blocker = cpu_kernels_blocker(dtype, remat)
    if requested == "cudnn":
        if platform != "gpu":
            raise ValueError(f"attention=cudnn needs a GPU, this is {platform}")
        if blocker:
            raise ValueError(f"attention=cudnn: {blocker}")
    if requested == "cpu" and cpu_blocker:
        raise ValueError(f"attention=cpu: {cpu_blocker}")
    if requested != "auto":
        return requested
    if platform == "gpu":
        return "xla" if blocker else "cudnn"
    if platform == "cpu":
        return "xla" if cpu_blocker else "cpu"
    return "xla"


def cpu_kernels_blocker(dtype, remat: str) -> str | None:
    """Why the cpu kernels cannot serve this model, or None if they can."""
    if jnp.dtype(dtype) != jnp.dtype(jnp.float32):
        return f"the cpu kernels compute in float32, not {jnp.dtype(dtype).name} (use attention=xla)"
    if remat != "none":
        return f"the cpu kernels store their own residuals and take remat=none, not remat={remat}"
    return None


def attend(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, *, backend: str, is_causal: bool = False,
           kv_lengths_B=None, mask_BxTxS=None, dropout_rate: float = 0.0, dropout_key=None):
    """Attention of T queries over S keys -> (B, T, H, K) in v's dtype (softmax in float32).

    is_causal: query t sees keys <= t (queries and keys both start at position 0).
    kv_lengths_B: row b sees only its first kv_lengths_B[b] keys (right padding).
    mask_BxTxS: a dense boolean mask, for what the two above cannot say (per-row offsets into
      a KV cache). Combined with them.
    dropout_rate/dropout_key: dropout on the probabilities (training); forces the plain form.
    """
    if (dropout_rate > 0 and dropout_key is not None) or backend == "cpu":
        return _plain(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, is_causal, kv_lengths_B, mask_BxTxS,
                      dropout_rate, dropout_key)
    if backend not in ("xla", "cudnn"):
        raise ValueError(f"unknown attention backend {backend!r}")
    return jax.nn.dot_product_attention(
        q_BxTxHxK, k_BxSxHxK.astype(q_BxTxHxK.dtype), v_BxSxHxK.astype(q_BxTxHxK.dtype),
        mask=None if mask_BxTxS is None else mask_BxTxS[:, None],
        is_causal=is_causal, key_value_seq_lengths=kv_lengths_B, implementation=backend)


def allowed_keys(T: int, S: int, is_causal: bool, kv_lengths_B=None, mask_BxTxS=None):
    """The boolean (B or 1, T, S) mask that `attend`'s arguments describe."""
    allowed = jnp.ones((1, T, S), bool)
    if is_causal:
        allowed = allowed & (jnp.arange(S)[None, None, :] <= jnp.arange(T)[None, :, None])
    if kv_lengths_B is not None:
        allowed = allowed & (jnp.arange(S)[None, None, :] < kv_lengths_B[:, None, None])
    if mask_BxTxS is not None:
        allowed = allowed & mask_BxTxS
    return allowed


def _plain(q, k, v, is_causal, kv_lengths_B, mask_BxTxS, dropout_rate, dropout_key):
    """Scores, float32 softmax, (dropout), values: the textbook form, as einsums."""
    B, T, H, K = q.shape
    S = k.shape[1]
    dt = v.dtype
    s_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q, k.astype(q.dtype),
                           preferred_element_type=jnp.float32) / math.sqrt(K)
    allowed = allowed_keys(T, S, is_causal, kv_lengths_B, mask_BxTxS)
    s_BxHxTxS = jnp.where(allowed[:, None], s_BxHxTxS, _NEG)
    p_BxHxTxS = jax.nn.softmax(s_BxHxTxS, axis=-1)
    if dropout_rate > 0 and dropout_key is not None:
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, p_BxHxTxS.shape)
        p_BxHxTxS = jnp.where(keep, p_BxHxTxS / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhts,bshk->bthk", p_BxHxTxS.astype(dt), v)
