"""The `cpu` attention backend's one-token decode step: layouts that XLA:CPU runs fastest.

`GPT.decode_step` is the reference; this computes the same function (tests/test_cpu_kernels.py
and the generation tests compare them) with three CPU-specific choices, measured on XLA:CPU:
- A head-major working cache, (B, H, S, K) per layer: every (row, head) reads one contiguous
  S x K block, so one-token attention is two plain batched matrix-vector products. The decode
  loop (jaxgpt/generation/engine.py) transposes the public (B, S, H, K) cache into this layout
  once per call and back at its end (`to_head_major` / `from_head_major`), not per token.
  Measured: the whole decode step 1.2-1.3x faster at 8 and 64 rows.
- Above one row, transposed activations (D, B) against weight copies stored (out, in): each
  matmul is W (out, in) @ x (in, B). For GPT-2 124M's layer matmuls with weights streamed from
  memory that measured 1.3x (1 row), 1.9x (8 rows) and 1.8x (64 rows) faster than
  x (B, in) @ W (in, out). The activations stay transposed through the whole block: asking for
  a (B, out) result makes XLA choose the slow form again. (At one row the 6-layer model ran
  slower this way, so one row keeps the (B, in) form.) int8 weights take the transposed form at
  one row too: it is the layout the int8 kernel (int8_matmul.cc) reads, one contiguous int8
  row per output; and in XLA's chunked fallback, chunks of (out, in) rows multiply as W @ x,
  while chunks of an (in, out) matrix must be accumulated (GPT-2 124M at one row, 12.5-12.8
  against 17.4-21.1 ms per step).
- The LM head: at one row against a (D, Vp) copy of the tied embedding (XLA:CPU runs the (Vp, D)
  table read along its rows at ~2/3 of the speed); above one row as (Vp, D) @ (D, B) with the
  greedy argmax reduced over V in that (V, B) layout (1.6x faster at 8 rows).
The copies are made once per `generate` call (`prepare`), never per token.

Shapes in names: B rows, S cache slots, H heads, K head dim, D width, Vp padded vocabulary.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxgpt import quant
from jaxgpt.generation.sampling import first_argmax
from jaxgpt.model import LN_EPS, _layer_norm, _linear

_NEG = -1e30
_MATRICES = ("w_qkv", "w_attn_out", "w_fc", "w_mlp_out")


def prepare(layers: list[dict], wte_VpxD, rows: int, dtype) -> dict:
    """The weights decode reads, for a batch of `rows` rows (see the module docstring).

    layers: `GPT.layer_params()` (per-layer dicts, matrices already in the compute dtype).
    int8 matrices (jaxgpt/quant.py) stay int8 in every layout: their scales move with them.
    """
    wte = quant.compute_weight(wte_VpxD, dtype)
    if rows == 1 and not quant.is_quantized(wte):
        return {"layers": layers, "head_DxVp": quant.transpose(wte)}
    out_in = [{(n + "_out_in" if n in _MATRICES else n): (quant.transpose(a) if n in _MATRICES else a)
               for n, a in p.items()} for p in layers]
    return {"layers": out_in, "head_VpxD": wte}


def to_head_major(cache: dict) -> dict:
    """(B, S, H, K) -> (B, H, S, K) for every layer's K and V."""
    return dict(cache, k=[jnp.swapaxes(a, 1, 2) for a in cache["k"]],
                v=[jnp.swapaxes(a, 1, 2) for a in cache["v"]])


from_head_major = to_head_major  # the same axis swap undoes itself


def decode_step(model, token_B, positions_B, cache_hm: dict, weights: dict):
    """`GPT.decode_step` on a head-major cache with `prepare`d weights: (h_BxD, cache_hm)."""
    cfg, dt = model.cfg, model.dtype
    start_B = cache_hm["length"]
    S = cache_hm["k"][0].shape[2]
    # Attend to the slots this row filled before (< length); the new key/value is added apart.
    valid_BxS = jnp.arange(S)[None, :] < start_B[:, None]
    x_BxD = model._embed(token_B[:, None], positions_B[:, None], None)[:, 0]
    ks, vs = list(cache_hm["k"]), list(cache_hm["v"])
    transposed = "head_VpxD" in weights
    x = x_BxD.T if transposed else x_BxD
    for i, p in enumerate(weights["layers"]):
        block = _block_transposed if transposed else _block_rows
        x, (ks[i], vs[i]) = block(cfg, dt, p, x, (ks[i], vs[i]), valid_BxS, start_B)
    x_BxD = x.T if transposed else x
    return model._final_norm(x_BxD), {"k": ks, "v": vs, "length": start_B + 1}


def head(model, h_BxD, weights: dict):
    """(logits_BxV float32 over the real vocabulary, greedy_B or None) in the layout above."""
    V = model.cfg.vocab_size
    if "head_DxVp" in weights:
        w = weights["head_DxVp"]
        if quant.is_quantized(w):
            logits = quant.matmul(h_BxD, w, model.dtype, jnp.float32)
        else:
            logits = jnp.einsum("bd,dv->bv", h_BxD, w, preferred_element_type=jnp.float32)
        return logits[:, :V], None
    # Asking for (B, V) logits makes XLA emit the slow (B, D) @ (D, Vp) form again.
    w = weights["head_VpxD"]
    if quant.is_quantized(w):
        logits_VxB = quant.matmul_T(w, h_BxD.astype(model.dtype).T, model.dtype, jnp.float32)[:V]
    else:
        logits_VxB = jnp.einsum("vd,bd->vb", w, h_BxD.astype(model.dtype),
                                preferred_element_type=jnp.float32)[:V]
    return logits_VxB.T, first_argmax(logits_VxB, axis=0)


def _attention(q_BxHxK, k_new_BxHxK, v_new_BxHxK, k_BxHxSxK, v_BxHxSxK, valid_BxS):
    """One query per row against the cache as it was (slots where valid_BxS) plus the row's own
    new key/value -> (B, H, K) in v's dtype, with a float32 softmax."""
    K = k_BxHxSxK.shape[-1]
    dt = v_BxHxSxK.dtype
    scale = 1.0 / math.sqrt(K)
    s_BxHxS = jnp.einsum("bhsk,bhk->bhs", k_BxHxSxK, q_BxHxK.astype(dt),
                         preferred_element_type=jnp.float32)
    s_BxHxS = jnp.where(valid_BxS[:, None, :], s_BxHxS * scale, _NEG)
    s_new_BxH = jnp.sum(q_BxHxK.astype(jnp.float32) * k_new_BxHxK.astype(jnp.float32), -1) * scale
    m_BxH = jnp.maximum(jnp.max(s_BxHxS, axis=-1), s_new_BxH)
    e_BxHxS = jnp.exp(s_BxHxS - m_BxH[..., None])
    e_new_BxH = jnp.exp(s_new_BxH - m_BxH)
    inv_BxH = 1.0 / (jnp.sum(e_BxHxS, axis=-1) + e_new_BxH)
    y_BxHxK = jnp.einsum("bhs,bhsk->bhk", e_BxHxS.astype(dt), v_BxHxSxK,
                         preferred_element_type=jnp.float32)
    y_BxHxK = (y_BxHxK + e_new_BxH[..., None] * v_new_BxHxK.astype(jnp.float32)) * inv_BxH[..., None]
    return y_BxHxK.astype(dt)


def _write_slot(cache_BxHxSxK, new_BxHxK, slot_B):
    """Write each row's new (H, K) entry at its own slot (in place once the cache is donated).
    A slot >= S is dropped, never clamped onto a valid one."""
    rows_B = jnp.arange(new_BxHxK.shape[0], dtype=jnp.int32)
    return cache_BxHxSxK.at[rows_B, :, slot_B].set(new_BxHxK.astype(cache_BxHxSxK.dtype), mode="drop")


def _attend_then_write(q_BxHxK, k_BxHxK, v_BxHxK, kv_cache, valid_BxS, start_B, dt):
    """Attention over the cache as it was plus the new key/value, then the new key/value
    written at each row's slot. Returns (y_BxHxK, (k_cache, v_cache)).

    The writes must come after the reads, or XLA has to copy each cache to update it in place
    (it did: ~4 copies of every layer's cache per token). JAX has no control dependencies and
    XLA:CPU drops optimization barriers, so the new entries are made to depend on the reads'
    result: `0 * y` is not simplified away for floats (NaN semantics) and costs B*H*K flops.
    """
    k_old, v_old = kv_cache
    y_BxHxK = _attention(q_BxHxK, k_BxHxK, v_BxHxK, k_old.astype(dt), v_old.astype(dt), valid_BxS)
    dep_BxHx1 = 0 * y_BxHxK[:, :, :1]
    return y_BxHxK, (_write_slot(k_old, k_BxHxK + dep_BxHx1.astype(k_BxHxK.dtype), start_B),
                     _write_slot(v_old, v_BxHxK + dep_BxHx1.astype(v_BxHxK.dtype), start_B))


def _block_rows(cfg, dt, p, x_BxD, kv_cache, valid_BxS, start_B):
    """`model._block` for one token per row, activations (B, D)."""
    B, D = x_BxD.shape
    H, K = cfg.n_head, cfg.head_dim
    get = p.get
    h = _layer_norm(x_BxD, p["ln1_scale"], get("ln1_bias")).astype(dt)
    q, k, v = (a.reshape(B, H, K) for a in jnp.split(_linear(h, p["w_qkv"], get("b_qkv"), dt), 3, -1))
    y_BxHxK, kv_cache = _attend_then_write(q, k, v, kv_cache, valid_BxS, start_B, dt)
    x_BxD = x_BxD + _linear(y_BxHxK.reshape(B, D), p["w_attn_out"], get("b_attn_out"), dt)
    h = _layer_norm(x_BxD, p["ln2_scale"], get("ln2_bias")).astype(dt)
    h = jax.nn.gelu(_linear(h, p["w_fc"], get("b_fc"), dt), approximate=True)
    return x_BxD + _linear(h, p["w_mlp_out"], get("b_mlp_out"), dt), kv_cache


def _block_transposed(cfg, dt, p, x_DxB, kv_cache, valid_BxS, start_B):
    """`model._block` for one token per row with activations (D, B) and matrices (out, in)."""
    D, B = x_DxB.shape
    H, K = cfg.n_head, cfg.head_dim
    get = p.get

    def ln(x, scale, bias):  # LayerNorm over axis 0 (features), float32
        x32 = x.astype(jnp.float32)
        mean = x32.mean(0, keepdims=True)
        var = jnp.square(x32 - mean).mean(0, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + LN_EPS) * scale[:, None]
        return (y + bias[:, None] if bias is not None else y).astype(dt)

    def lin(w_OxI, x_IxB, b):
        if quant.is_quantized(w_OxI):
            y = quant.matmul_T(w_OxI, x_IxB, dt)
        else:
            y = jnp.einsum("oi,ib->ob", w_OxI.astype(dt), x_IxB)
        return y + b.astype(dt)[:, None] if b is not None else y

    h = ln(x_DxB, p["ln1_scale"], get("ln1_bias"))
    qkv_3DxB = lin(p["w_qkv_out_in"], h, get("b_qkv"))
    q, k, v = (a.T.reshape(B, H, K) for a in jnp.split(qkv_3DxB, 3, axis=0))
    y_BxHxK, kv_cache = _attend_then_write(q, k, v, kv_cache, valid_BxS, start_B, dt)
    x_DxB = x_DxB + lin(p["w_attn_out_out_in"], y_BxHxK.reshape(B, D).T, get("b_attn_out"))
    h = ln(x_DxB, p["ln2_scale"], get("ln2_bias"))
    h = jax.nn.gelu(lin(p["w_fc_out_in"], h, get("b_fc")), approximate=True)
    return x_DxB + lin(p["w_mlp_out_out_in"], h, get("b_mlp_out")), kv_cache
