"""The `cpu` attention backend's no-cache stack: the blocks' forward with a hand-written backward.

`stack` computes exactly what `model._block` computes, layer after layer, without a KV cache and
without dropout, in float32; `jax.custom_vjp` gives it a backward written out by hand.
`GPT.hidden` uses it when the model's backend is `cpu` (see jaxgpt/attention.py: `auto` picks it
on CPU for float32 models without remat); a training forward with dropout takes the reference
`lax.scan` path instead. tests/test_cpu_kernels.py checks that both give the same hidden states
and gradients.

Why by hand: profiled on XLA:CPU, the autodiff of the layer scan spent ~40% of a training step
outside the matmuls, in three places this file avoids:
- Stacked residuals. Scan's backward saves every layer's activations into (L, ...) buffers that
  are zero-filled, written with dynamic-update-slice and read back with dynamic-slice each
  step. Here the layers are unrolled and each layer's residuals are separate buffers; per-layer
  parameter gradients are stacked once at the end. (An unrolled loop under plain autodiff is
  worse still: the gradient of `params[i]` is a zero-padded (L, ...) array per layer, summed.)
- Transposed copies. A weight gradient contracts the token axis of two activations; XLA:CPU
  materialises the transpose of the dot's left operand, and when layout assignment chose the
  wide MLP activation (N, 4D) it wrote that transpose with the GELU fused in, at a fraction of
  memory speed. Every weight-gradient dot here puts the narrower operand on the left.
- The masked half of causal attention. Queries are taken in chunks of `_chunk_len(T)`; chunk
  [a, b) only reads keys < b, so about half of the (T, T) scores, softmax and both attention
  matmuls of forward and backward are never computed. Only the diagonal block needs the mask.

Shapes: B batch, T tokens, D width, H heads, K head dim, F = 4D, L layers.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

LN_EPS = 1e-5  # == model.LN_EPS
_NEG = -1e30  # == attention._NEG
_GELU_C = math.sqrt(2.0 / math.pi)


def _chunk_len(T: int) -> int:
    # 64 query rows per chunk measured best at T=256 (tests cover any T, chunks may be ragged).
    return T if T <= 64 else 64


# ---------------------------------------------------------------- pieces
def _ln_fwd(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    xc = x - mean
    rstd = jax.lax.rsqrt(jnp.square(xc).mean(-1, keepdims=True) + LN_EPS)
    xhat = xc * rstd
    y = xhat * scale
    return (y + bias if bias is not None else y), xhat, rstd


def _ln_bwd(dy, xhat, rstd, scale):
    """(dx, dscale, dbias) of y = xhat * scale + bias, xhat = (x - mean) * rstd."""
    tok = tuple(range(dy.ndim - 1))
    dscale, dbias = jnp.sum(dy * xhat, axis=tok), jnp.sum(dy, axis=tok)
    g = dy * scale
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx, dscale, dbias


def _gelu(u):  # jax.nn.gelu(approximate=True)
    return 0.5 * u * (1.0 + jnp.tanh(_GELU_C * (u + 0.044715 * u ** 3)))


def _gelu_grad(u):
    t = jnp.tanh(_GELU_C * (u + 0.044715 * u ** 3))
    return 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * u * u)


def _linear(x, w, b):
    y = jnp.einsum("...i,io->...o", x, w)
    return y + b if b is not None else y


def _wgrad(a_BxTxI, d_BxTxO):
    """a^T d over all tokens, (I, O). XLA:CPU transposes the dot's left operand, so the narrower
    of the two activations goes on the left (see the module docstring)."""
    if a_BxTxI.shape[-1] <= d_BxTxO.shape[-1]:
        return jnp.einsum("bti,bto->io", a_BxTxI, d_BxTxO)
    return jnp.einsum("bto,bti->oi", d_BxTxO, a_BxTxI).T


def _chunks(T: int, C: int):
    return [(a, min(a + C, T)) for a in range(0, T, C)]


def _chunk_mask(a, b):
    """Allowed keys [0, b) for queries [a, b): causal (static)."""
    return jnp.arange(b)[None, :] <= jnp.arange(a, b)[:, None]


# ---------------------------------------------------------------- attention, (B, H, T, K)
def _attn_fwd(q, k, v):
    B, H, T, K = q.shape
    C = _chunk_len(T)
    ys, probs = [], []
    for a, b in _chunks(T, C):
        s_BxHxCxS = jnp.einsum("bhtk,bhsk->bhts", q[:, :, a:b], k[:, :, :b]) / math.sqrt(K)
        s_BxHxCxS = jnp.where(_chunk_mask(a, b), s_BxHxCxS, _NEG)
        p_BxHxCxS = jax.nn.softmax(s_BxHxCxS, axis=-1)
        ys.append(jnp.einsum("bhts,bhsk->bhtk", p_BxHxCxS, v[:, :, :b]))
        probs.append(p_BxHxCxS)
    return (jnp.concatenate(ys, axis=2) if len(ys) > 1 else ys[0]), probs


def _attn_bwd(q, k, v, probs, dy, delta_BxHxT):
    """(dq, dk, dv); delta = rowsum(dy * y), the softmax backward's per-row term."""
    B, H, T, K = q.shape
    C = _chunk_len(T)
    dqs, dk, dv = [], jnp.zeros_like(k), jnp.zeros_like(v)
    for (a, b), p in zip(_chunks(T, C), probs):
        dy_c = dy[:, :, a:b]
        dv = dv.at[:, :, :b].add(jnp.einsum("bhts,bhtk->bhsk", p, dy_c))
        dp = jnp.einsum("bhtk,bhsk->bhts", dy_c, v[:, :, :b])
        ds = p * (dp - delta_BxHxT[:, :, a:b, None])
        ds = jnp.where(_chunk_mask(a, b), ds, 0.0) / math.sqrt(K)
        dqs.append(jnp.einsum("bhts,bhsk->bhtk", ds, k[:, :, :b]))
        dk = dk.at[:, :, :b].add(jnp.einsum("bhts,bhtk->bhsk", ds, q[:, :, a:b]))
    return (jnp.concatenate(dqs, axis=2) if len(dqs) > 1 else dqs[0]), dk, dv


# ---------------------------------------------------------------- one block
def _block_fwd(p, x_BxTxD, n_head):
    B, T, D = x_BxTxD.shape
    H, K = n_head, D // n_head
    get = p.get
    h1, xhat1, rstd1 = _ln_fwd(x_BxTxD, p["ln1_scale"], get("ln1_bias"))
    qkv_BxTx3D = _linear(h1, p["w_qkv"], get("b_qkv"))
    q, k, v = qkv_BxTx3D.reshape(B, T, 3, H, K).transpose(2, 0, 3, 1, 4)  # each (B, H, T, K)
    y_BxHxTxK, probs = _attn_fwd(q, k, v)
    y_BxTxD = y_BxHxTxK.transpose(0, 2, 1, 3).reshape(B, T, D)
    x2 = x_BxTxD + _linear(y_BxTxD, p["w_attn_out"], get("b_attn_out"))
    h2, xhat2, rstd2 = _ln_fwd(x2, p["ln2_scale"], get("ln2_bias"))
    u_BxTxF = _linear(h2, p["w_fc"], get("b_fc"))
    g_BxTxF = _gelu(u_BxTxF)
    out = x2 + _linear(g_BxTxF, p["w_mlp_out"], get("b_mlp_out"))
    res = dict(h1=h1, xhat1=xhat1, rstd1=rstd1, q=q, k=k, v=v, probs=probs, y=y_BxTxD,
               h2=h2, xhat2=xhat2, rstd2=rstd2, u=u_BxTxF, g=g_BxTxF)
    return out, res


def _block_bwd(p, res, dout_BxTxD, n_head):
    """(dx, dp) of one block, given its output cotangent."""
    B, T, D = dout_BxTxD.shape
    H, K = n_head, D // n_head
    has_bias = "b_qkv" in p
    tok = (0, 1)
    dp = {}
    # MLP: out = x2 + gelu(h2 @ w_fc + b_fc) @ w_mlp_out + b_mlp_out
    dg = jnp.einsum("btd,fd->btf", dout_BxTxD, p["w_mlp_out"])
    dp["w_mlp_out"] = _wgrad(res["g"], dout_BxTxD)
    du = dg * _gelu_grad(res["u"])
    dh2 = jnp.einsum("btf,df->btd", du, p["w_fc"])
    dp["w_fc"] = _wgrad(res["h2"], du)
    dx2, dp["ln2_scale"], dln2_bias = _ln_bwd(dh2, res["xhat2"], res["rstd2"], p["ln2_scale"])
    dx2 = dx2 + dout_BxTxD
    # attention: x2 = x + attn(ln1(x)) @ w_attn_out + b_attn_out
    dy_BxTxHxK = jnp.einsum("bte,de->btd", dx2, p["w_attn_out"]).reshape(B, T, H, K)
    dp["w_attn_out"] = _wgrad(res["y"], dx2)
    delta_BxHxT = jnp.einsum("bthk,bthk->bht", dy_BxTxHxK, res["y"].reshape(B, T, H, K))
    dq, dk, dv = _attn_bwd(res["q"], res["k"], res["v"], res["probs"],
                           dy_BxTxHxK.transpose(0, 2, 1, 3), delta_BxHxT)
    dqkv_BxTx3D = jnp.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * D)
    dh1 = jnp.einsum("bte,de->btd", dqkv_BxTx3D, p["w_qkv"])
    dp["w_qkv"] = _wgrad(res["h1"], dqkv_BxTx3D)
    dx1, dp["ln1_scale"], dln1_bias = _ln_bwd(dh1, res["xhat1"], res["rstd1"], p["ln1_scale"])
    if has_bias:
        dp.update(b_mlp_out=dout_BxTxD.sum(tok), b_fc=du.sum(tok), ln2_bias=dln2_bias,
                  b_attn_out=dx2.sum(tok), b_qkv=dqkv_BxTx3D.sum(tok), ln1_bias=dln1_bias)
    return dx1 + dx2, dp


# ---------------------------------------------------------------- the stack
def _unstack(blocks):
    """Per-layer parameter dicts (the backward reuses the forward's slices)."""
    L = next(iter(blocks.values())).shape[0]
    return [{name: a[i] for name, a in blocks.items()} for i in range(L)]


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def stack(blocks, x_BxTxD, n_head: int):
    """All layers of `blocks` (dict of (L, ...) float32 arrays, as in `model.Blocks`) on the
    float32 residual stream x, with causal attention. Differentiable in blocks and x."""
    for p in _unstack(blocks):
        x_BxTxD, _ = _block_fwd(p, x_BxTxD, n_head)
    return x_BxTxD


def _stack_fwd(blocks, x_BxTxD, n_head):
    layers, saved = _unstack(blocks), []
    for p in layers:
        x_BxTxD, res = _block_fwd(p, x_BxTxD, n_head)
        saved.append(res)
    return x_BxTxD, (layers, saved)


def _stack_bwd(n_head, residuals, dx_BxTxD):
    layers, saved = residuals
    dps = [None] * len(saved)
    for i in reversed(range(len(saved))):
        dx_BxTxD, dps[i] = _block_bwd(layers[i], saved[i], dx_BxTxD, n_head)
    dblocks = {name: jnp.stack([dp[name] for dp in dps]) for name in layers[0]}
    return dblocks, dx_BxTxD


stack.defvjp(_stack_fwd, _stack_bwd)
