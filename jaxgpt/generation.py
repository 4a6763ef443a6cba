"""Autoregressive generation: one prefill pass, then `lax.scan` decode chunks over a KV cache.

Shapes in names: B rows (batch bucket), T prompt bucket, S cache slots, N steps, V vocabulary.

The pieces, usable on their own by callers that drive their own loop:
  prefill(graphdef, params, tokens_BxT, lengths_B, cache) -> (logits_BxV, cache)
  init_decode_state(logits_BxV, cache, tokens_BxT, lengths_B, ...) -> (DecodeState, token_B)
  decode(graphdef, params, state, n_steps, weights=None) -> (state, tokens_BxN)
  decode_weights(graphdef, params, one_row) -> weights (build once, pass to every decode call)
`generate()` wires them together; `logits()` is the cache-free reference forward.

Design decisions (why, not what):
- The model is split with `nnx.split`: the graphdef is static (hashable), the weights are jit
  ARGUMENTS. Closing over weights would bake them into the program as constants: a recompile
  per model and, at 124M parameters, a huge constant-folded program.
- The cache and the decode state are DONATED: XLA then updates the (B, S, H, K) buffers in
  place. Without donation every step copies every layer's cache.
- Prompts are RIGHT-padded and every row keeps its own length, so each token sits at its true
  position (learned absolute position embeddings make left padding shift every position).
  The model writes each row's new key/value at that row's own slot and masks slots past it.
- Static shapes by design: batch, prompt length and cache length are rounded up to buckets
  (`bucket`), and the cache is sized to prompt + new tokens (capped at block_size) rather than
  always block_size: decode attention reads all S slots every step, so an oversized cache is
  paid on every token. Which sampling filters exist is static too (`SamplingFlags`), and the
  per-row knobs are arrays, so mixed requests share one program.
- Decode runs `n_steps` tokens per jitted call under `lax.scan`; between calls the host asks
  "are all rows done?" and stops early. The same chunks feed streaming.
- Past the window: positions are learned up to block_size, so once a row's next position
  reaches block_size its cache is useless (every kept token would move to a new position).
  Such a row recomputes its last block_size tokens at positions 0..block_size-1 each step,
  exactly what a fixed-context GPT does; the extra forward runs under `lax.cond` only when some
  row needs it, and is compiled in only when the request can reach the window at all.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import numbers
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.errors import UserError
from jaxgpt.model import init_cache
from jaxgpt.sampling import SamplingFlags, SamplingParams, first_argmax, sample

PAD = -1  # what a finished (or dummy) row emits in decode's token output
DEFAULT_CHUNK = 32  # decode steps per jitted call: long enough to amortise dispatch + host sync

# Trace counts per jitted function ("trace:<name>") and host-side decode calls ("decode_calls"):
# a trace is a compilation, so tests bound recompiles with it. Counted inside the traced Python
# body, which runs once per new (shape, static args) combination.
STATS: collections.Counter = collections.Counter()


def bucket(n: int, minimum: int = 16) -> int:
    """Round n up to `minimum`, then to a multiple of an eighth of its next power of two.

    Gives 16, 32, 48, 64, 80, 96, 112, 128, 160, 192, ..., 256, 320, 384, ...: four shapes per
    octave (few compilations) and under 25% padding (little wasted compute or cache).
    """
    if n <= minimum:
        return minimum
    step = max(minimum, (1 << (n - 1).bit_length()) // 8)
    return -(-n // step) * step


def batch_bucket(n: int) -> int:
    """Batch rows: powers of two up to 8 (small batches are common), then `bucket`."""
    return 1 << (n - 1).bit_length() if n <= 8 else bucket(n, 8)


# ----------------------------------------------------------------------------- decode state
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["cache", "token_B", "n_B", "n_new_B", "max_new_B", "done_B", "eos_B", "row_id_B",
                 "key", "sampling", "history_BxN", "presence_BxV"],
    meta_fields=["flags", "windowed"])
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything decode carries between steps; a pytree, donated to every `decode` call.

    cache: the KV cache, (B, S, H, K) per layer as `init_cache` and `prefill` make it (each
      `decode` call works on a head-major copy and writes it back: the cache's memory twice
      while it runs); cache["length"][b] = slots row b has filled (= n_B[b] - 1 while the
      row is inside the window: the last token is fed at the next step).
    token_B: each row's last token, the next one to feed. n_B: the row's tokens so far (kept
      prompt + generated, token_B included). n_new_B / max_new_B: generated so far / allowed.
    done_B: the row hit EOS or max_new (or is a dummy row); it emits PAD and stops changing.
    eos_B: each row's EOS id, -1 for none. row_id_B: the row's index in the caller's prompt
      list (seeds its randomness). key: the one PRNG key of this generation.
    history_BxN: all tokens of each row (only when `windowed`; else (B, 1) unused).
    presence_BxV: tokens seen by each row (only with the repetition penalty; else (B, 1)).
    flags, windowed: static; part of the compiled program's identity.
    """
    cache: dict
    token_B: jax.Array
    n_B: jax.Array
    n_new_B: jax.Array
    max_new_B: jax.Array
    done_B: jax.Array
    eos_B: jax.Array
    row_id_B: jax.Array
    key: jax.Array
    sampling: SamplingParams
    history_BxN: jax.Array
    presence_BxV: jax.Array
    flags: SamplingFlags = SamplingFlags()
    windowed: bool = False


def _lm_head(model, h_BxD):
    """The model's tied LM head on selected hidden states (float32 logits, real vocabulary)."""
    wte = model.wte[...].astype(model.dtype)
    logits = jnp.einsum("bd,vd->bv", h_BxD.astype(model.dtype), wte, preferred_element_type=jnp.float32)
    return logits[:, :model.cfg.vocab_size]


def _advance(state: DecodeState, logits_BxV, active_B, greedy_B=None):
    """Sample each active row's next token from logits_BxV and record it in the state."""
    token_B = sample(logits_BxV, state.sampling, state.flags, state.key, state.row_id_B,
                     state.n_new_B, state.presence_BxV, greedy_B)
    token_B = jnp.where(active_B, token_B, PAD)
    history, presence = state.history_BxN, state.presence_BxV
    rows_B = jnp.arange(token_B.shape[0])
    safe_B = jnp.maximum(token_B, 0)
    if state.windowed:
        # Inactive rows write out of range (index N): dropped, so their history stays intact.
        col_B = jnp.where(active_B, state.n_B, history.shape[1])
        history = history.at[rows_B, col_B].set(safe_B, mode="drop")
    if state.flags.repetition_penalty:
        presence = presence.at[rows_B, safe_B].max(active_B)
    n_new_B = state.n_new_B + active_B
    done_B = state.done_B | (active_B & ((token_B == state.eos_B) | (n_new_B >= state.max_new_B)))
    new = dataclasses.replace(
        state, token_B=jnp.where(active_B, token_B, state.token_B), n_B=state.n_B + active_B,
        n_new_B=n_new_B, done_B=done_B, history_BxN=history, presence_BxV=presence)
    return new, token_B


# ----------------------------------------------------------------------------- jitted blocks
@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def prefill(graphdef, params, tokens_BxT, lengths_B, cache):
    """Run the prompts through the model in one pass, filling the cache.

    graphdef, params: `nnx.split(model)` (graphdef static, params an array pytree).
    tokens_BxT: int32 prompts, RIGHT-padded (padding content is irrelevant).
    lengths_B: int32 real tokens per row, 1 <= lengths_B <= T.
    cache: from `init_cache(cfg, B, S, dtype)` with S >= cache["length"] + T; DONATED. A fresh
      cache (length 0) starts at position 0; a partly filled one continues each row at its own
      length (chunked prefill), with positions = length + t.
    Returns (logits_BxV float32 at each row's last real token, cache with length += lengths_B).
    """
    STATS["trace:prefill"] += 1
    model = nnx.merge(graphdef, params)
    B, T = tokens_BxT.shape
    start_B = cache["length"]
    positions_BxT = start_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    # Only the last real token's logits are needed: T x V of head matmul would be wasted.
    last_BxD, cache = model(tokens_BxT, positions_BxT, cache, return_hidden=True,
                            hidden_at_B=lengths_B - 1)
    # The model advanced every row by T; the padding slots past a row's length are garbage that
    # the mask hides and the next writes overwrite.
    cache = dict(cache, length=start_B + lengths_B)
    return _lm_head(model, last_BxD), cache


@functools.partial(jax.jit, static_argnames=("flags", "windowed", "history_len"),
                   donate_argnames=("cache",))
def init_decode_state(logits_BxV, cache, tokens_BxT, lengths_B, max_new_B, eos_B, row_id_B, key,
                      sampling: SamplingParams, *, flags: SamplingFlags, windowed: bool,
                      history_len: int):
    """Build the decode state after `prefill` and sample each row's first new token (step 0).

    max_new_B: tokens each row may generate (0 for dummy rows: they start done).
    eos_B: EOS id per row or -1. row_id_B: each row's index in the caller's list (randomness).
    key: a PRNG key (`jax.random.key(seed)`). sampling/flags: see `jaxgpt.sampling`.
    windowed: compile the past-the-window path (needed when prompt + new tokens - 1 > S);
      history_len (>= prompt + new tokens) then sizes the token history it needs.
    Returns (state, token_B) with PAD for rows that produce nothing.
    """
    STATS["trace:init_decode_state"] += 1
    B, T = tokens_BxT.shape
    V = logits_BxV.shape[-1]
    valid_BxT = jnp.arange(T)[None, :] < lengths_B[:, None]
    if windowed:
        history = jnp.zeros((B, max(history_len, T)), jnp.int32).at[:, :T].set(tokens_BxT)
    else:
        history = jnp.zeros((B, 1), jnp.int32)
    if flags.repetition_penalty:
        rows_BxT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
        presence = jnp.zeros((B, V), bool).at[rows_BxT, tokens_BxT].max(valid_BxT)
    else:
        presence = jnp.zeros((B, 1), bool)
    state = DecodeState(
        cache=cache, token_B=jnp.zeros((B,), jnp.int32), n_B=lengths_B.astype(jnp.int32),
        n_new_B=jnp.zeros((B,), jnp.int32), max_new_B=max_new_B.astype(jnp.int32),
        done_B=max_new_B <= 0, eos_B=eos_B.astype(jnp.int32), row_id_B=row_id_B.astype(jnp.int32),
        key=key, sampling=sampling, history_BxN=history, presence_BxV=presence, flags=flags,
        windowed=windowed)
    return _advance(state, logits_BxV, max_new_B > 0)


def _decode_step(model, state: DecodeState, wte_T_DxVp, mats_T=None):
    """Feed each row's last token, sample the next. Returns (state, token_B, logits_BxV).

    wte_T_DxVp: the tied head's weight transposed (see `decode_weights`), for one row only.
    """
    cache = state.cache  # head-major: (B, H, S, K) per layer (see _decode_loop)
    S = cache["k"][0].shape[2]
    active_B = ~state.done_B
    pos_B = state.n_B - 1  # true position of the token being fed
    in_window_B = pos_B < S  # S < block_size implies every position fits (see generate)
    h_Bx1xD, new_cache = model(state.token_B[:, None], jnp.minimum(pos_B, S - 1)[:, None], cache,
                               return_hidden=True, weights_T=mats_T, heads_major=True)
    V = model.cfg.vocab_size
    h_BxD = h_Bx1xD[:, 0]
    if h_BxD.shape[0] == 1:
        logits_BxV = jnp.einsum("bd,dv->bv", h_BxD, wte_T_DxVp, preferred_element_type=jnp.float32)[:, :V]
        greedy_B = None
    else:
        # Above one row, XLA:CPU runs the head fastest as (Vp, D) @ (D, B), the weight as stored,
        # with the argmax reduced over the V axis of that (V, B) result: at 8 rows 1.6x faster
        # than (B, D) @ (D, Vp). Asking for (B, V) logits makes XLA emit the slow form again.
        logits_VxB = jnp.einsum("vd,bd->vb", model.wte[...].astype(h_BxD.dtype), h_BxD,
                                preferred_element_type=jnp.float32)[:V]
        greedy_B = first_argmax(logits_VxB, axis=0)
        logits_BxV = logits_VxB.T
    if state.windowed:
        W = model.cfg.block_size  # == S whenever a row can leave the window

        def window_logits():
            # The last W tokens of each row at positions 0..W-1: a full no-cache forward.
            idx_BxW = jnp.maximum(state.n_B[:, None] - W, 0) + jnp.arange(W)[None, :]
            win_BxW = jnp.take_along_axis(state.history_BxN, idx_BxW, axis=1)
            last_BxD, _ = model(win_BxW, return_hidden=True,
                                hidden_at_B=jnp.full(win_BxW.shape[:1], W - 1))
            return _lm_head(model, last_BxD)

        need = jnp.any(active_B & ~in_window_B)
        slid_BxV = jax.lax.cond(need, window_logits, lambda: jnp.zeros_like(logits_BxV))
        logits_BxV = jnp.where(in_window_B[:, None], logits_BxV, slid_BxV)
    # Done rows and rows past the window keep their length: their slot write (at `length`,
    # or dropped when that is S) touches only slots they never read again.
    advance_B = active_B & in_window_B
    new_cache = dict(new_cache, length=jnp.where(advance_B, cache["length"] + 1, cache["length"]))
    if state.windowed:
        greedy_B = None  # the window's rows have other logits
    state, token_B = _advance(dataclasses.replace(state, cache=new_cache), logits_BxV, active_B, greedy_B)
    return state, token_B, logits_BxV


@functools.partial(jax.jit, static_argnums=(0, 2))
def decode_weights(graphdef, params, one_row: bool = True):
    """The weights as decode's loop reads them; `generate` builds them once per call.

    Returns (layers, mats_T, wte_T_DxVp): `layers` holds stacked block parameters as lists of
    their L per-layer arrays; above one row (one_row False) the four weight matrices are
    instead in mats_T, per layer and transposed to (out, in), for `model._decode_block_T`
    (measured 1.3x faster decode at 8 rows of GPT-2 124M, and slower at one row of the 6-layer
    model). wte_T_DxVp is the tied head's weight transposed, only for one row. They are
    copies (the size of the weights), made once instead of once per token:
    - XLA:CPU copies a static slice of a stacked (L, ...) weight into a fresh buffer before
      each dot, i.e. every weight would be read twice and written once per token. Given the
      per-layer buffers, the loop re-stacks them and XLA folds slice(concatenate(w_0..), i)
      into w_i, so the dots read the buffers directly.
    - XLA:CPU runs h @ wte.T, the (Vp, D) weight read along its rows, at ~2/3 of the speed of
      the plain (D, Vp) product at one row.
    With a low-precision compute dtype the matrices are cast here, once, too.
    """
    STATS["trace:decode_weights"] += 1
    template = nnx.merge(graphdef, params)
    n_layer, dt = template.cfg.n_layer, template.dtype
    layers, mats_T = {}, None if one_row else [{} for _ in range(n_layer)]
    for name, a in params["blocks"].items():
        a = a[...]
        cast = dt != jnp.float32 and name.startswith(("w_", "b_"))  # LayerNorm stays float32
        if name.startswith("w_") and not one_row:  # (out, in): see model._decode_block_T
            for i in range(n_layer):
                mats_T[i][name + "_T"] = jnp.transpose(a[i].astype(dt))
        else:
            layers[name] = [a[i].astype(dt) if cast else a[i] for i in range(n_layer)]
    return layers, mats_T, jnp.transpose(params["wte"][...].astype(dt)) if one_row else None


@functools.partial(jax.jit, static_argnums=(0, 4), static_argnames=("return_logits",),
                   donate_argnums=3)
def _decode_loop(graphdef, params, weights, state: DecodeState, n_steps: int,
                 return_logits: bool = False):
    STATS["trace:decode"] += 1
    layers, mats_T, wte_T_DxVp = weights

    def body(st, _):
        p = jax.tree.map(lambda x: x, params)
        # With mats_T, the stacked matrices of `params` stay in p unread (and uncopied).
        p["blocks"] = dict(p["blocks"], **{name: jnp.stack(per_layer) for name, per_layer in layers.items()})
        st, token_B, logits_BxV = _decode_step(nnx.merge(graphdef, p), st, wte_T_DxVp, mats_T)
        return st, (token_B, logits_BxV if return_logits else None)

    # The steps run on a head-major copy of the cache, (B, H, S, K) per layer: one-token
    # attention then reads each (row, head)'s S x K block contiguously (see
    # model._decode_attention; 1.2-1.3x faster decode at 8 and 64 rows). The state keeps the
    # (B, S, H, K) layout of prefill and `init_cache` between calls, so the two transposes of
    # each layer's cache are paid once per call (n_steps tokens), not per token.
    state = _with_cache_axes_swapped(state)
    state, (tokens_NxB, logits_NxBxV) = jax.lax.scan(body, state, None, length=n_steps)
    state = _with_cache_axes_swapped(state)
    if return_logits:
        return state, tokens_NxB.T, jnp.swapaxes(logits_NxBxV, 0, 1)
    return state, tokens_NxB.T


def _with_cache_axes_swapped(state: DecodeState) -> DecodeState:
    """(B, S, H, K) <-> (B, H, S, K) for every layer's K and V."""
    swap = lambda caches: [jnp.swapaxes(a, 1, 2) for a in caches]  # noqa: E731
    cache = state.cache
    return dataclasses.replace(state, cache=dict(cache, k=swap(cache["k"]), v=swap(cache["v"])))


def decode(graphdef, params, state: DecodeState, n_steps: int, return_logits: bool = False,
           weights=None):
    """Run n_steps decode steps under `lax.scan` (one compiled program per n_steps).

    graphdef, params: `nnx.split(model)`. state: from `init_decode_state` or a previous call;
    DONATED (the cache is updated in place; use the returned state).
    weights: `decode_weights(graphdef, params, one_row=B == 1)`, to reuse across calls (else
      built per call).
    Returns (state, tokens_BxN) with PAD where a row was done, or with return_logits
    (state, tokens_BxN, logits_BxNxV): the logits each token was sampled from (before the
    sampling filters), for tests and scoring.
    """
    if weights is None:
        weights = decode_weights(graphdef, params, state.token_B.shape[0] == 1)
    return _decode_loop(graphdef, params, weights, state, n_steps, return_logits=return_logits)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens_BxT):
    STATS["trace:logits"] += 1
    logits_BxTxV, _ = nnx.merge(graphdef, params)(tokens_BxT)
    return logits_BxTxV


def logits(model, tokens_2d) -> jax.Array:
    """Plain full forward, no cache: (B, T, vocab) float32 logits. For scoring and as a reference."""
    tokens = np.asarray(tokens_2d)
    if tokens.ndim != 2 or tokens.shape[1] < 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise UserError(f"logits() needs a non-empty 2-D array of token ids, got shape {tokens.shape}")
    if tokens.shape[1] > model.cfg.block_size:
        raise UserError(f"logits(): {tokens.shape[1]} tokens exceed block_size={model.cfg.block_size}")
    bad = tokens[(tokens < 0) | (tokens >= model.cfg.vocab_size)]
    if bad.size:
        raise UserError(f"token id {int(bad[0])} is not in the vocabulary [0, {model.cfg.vocab_size})")
    graphdef, params = nnx.split(model)
    return _forward(graphdef, params, jnp.asarray(tokens, jnp.int32))


# ----------------------------------------------------------------------------- host driver
def _check_ids(ids, vocab, what):
    bad = [t for t in ids if not (isinstance(t, numbers.Integral) and 0 <= t < vocab)]
    if bad:
        raise UserError(f"{what} id {bad[0]!r} is not in the vocabulary [0, {vocab})")


def _per_row(name, value, n, default, check, msg):
    """Expand a scalar or per-prompt list to n values (None -> default), validating each."""
    if isinstance(value, (list, tuple, np.ndarray)):
        values = list(value)
        if len(values) != n:
            raise UserError(f"{name} has {len(values)} values for {n} prompts")
    else:
        values = [value] * n
    out = []
    for v in values:
        if v is None:
            out.append(default)
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not check(v):
            raise UserError(f"{name} {msg}, got {v!r}")
        out.append(v)
    return out


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature=1.0,
             top_k=None, top_p=None, min_p=None, repetition_penalty=None, eos_id=None, seed: int = 0,
             stream: bool = False, chunk: int = DEFAULT_CHUNK, row_ids=None):
    """Continue each prompt by up to max_new_tokens tokens; returns the new tokens per prompt.

    prompts: token-id lists of any lengths (>= 1 token each; prompts longer than block_size
      keep their last block_size tokens). temperature 0 means greedy. temperature, top_k,
      top_p, min_p and repetition_penalty take a scalar or a list with one value per prompt
      (None = off). With eos_id a row ends at, and includes, its first EOS.
    seed: one PRNG key for the call; row i draws from fold_in(key, row_ids[i]) (default
      row_ids = 0..n-1), so equal prompts give different samples, and a row generated alone
      with its row id reproduces the row generated in a batch.
    stream=True returns an iterator that yields, per decode chunk, a list (per prompt) of the
      tokens produced in that chunk. chunk: decode steps per jitted call.
    Bad values raise UserError (also when streaming: the arguments are checked before the
    iterator is returned).
    """
    cfg = model.cfg
    V, bs = cfg.vocab_size, cfg.block_size
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) \
            or max_new_tokens <= 0:
        raise UserError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise UserError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
        raise UserError(f"chunk must be a positive integer, got {chunk!r}")
    prompts = [list(p) for p in prompts]
    n = len(prompts)
    if n == 0:
        raise UserError("generate() needs at least one prompt")
    for i, p in enumerate(prompts):
        if not p:
            raise UserError(f"prompt {i} is empty (start it with the end-of-text token instead)")
        _check_ids(p, V, f"prompt {i}: token")
    if eos_id is not None:
        _check_ids([eos_id], V, "eos")
    temps = _per_row("temperature", temperature, n, 1.0, lambda v: v >= 0, "must be >= 0")
    top_ks = _per_row("top_k", top_k, n, 0, lambda v: v >= 1 and float(v).is_integer(),
                      "must be an integer >= 1")
    top_ps = _per_row("top_p", top_p, n, 1.0, lambda v: 0 < v <= 1, "must be in (0, 1]")
    min_ps = _per_row("min_p", min_p, n, 0.0, lambda v: 0 <= v <= 1, "must be in [0, 1]")
    reps = _per_row("repetition_penalty", repetition_penalty, n, 1.0, lambda v: v > 0, "must be > 0")
    top_ks = [min(int(k), V) for k in top_ks]
    ids = list(range(n)) if row_ids is None else list(row_ids)
    if len(ids) != n or not all(isinstance(r, numbers.Integral) and 0 <= r < 2**31 for r in ids):
        raise UserError(f"row_ids must be {n} integers in [0, 2**31)")

    # A filter is compiled in only if some sampling (non-greedy) row uses it; the repetition
    # penalty also changes greedy rows.
    sampled = [t > 0 for t in temps]
    flags = SamplingFlags(
        sample=any(sampled),
        top_k=any(s and 0 < k < V for s, k in zip(sampled, top_ks)),
        top_p=any(s and p < 1 for s, p in zip(sampled, top_ps)),
        min_p=any(s and m > 0 for s, m in zip(sampled, min_ps)),
        repetition_penalty=any(r != 1 for r in reps))

    kept = [p[-bs:] for p in prompts]
    P, N = max(len(p) for p in kept), int(max_new_tokens)
    B, T = batch_bucket(n), min(bucket(P), bs)
    S = min(bucket(P + N), bs)  # >= T: bucket is monotonic and both are capped at bs
    windowed = P + N - 1 > S  # some row's last fed position would not fit the cache

    tokens = np.zeros((B, T), np.int32)
    lengths = np.ones((B,), np.int32)  # dummy rows: one token, max_new 0
    for i, p in enumerate(kept):
        tokens[i, :len(p)] = p
        lengths[i] = len(p)
    max_new = np.zeros((B,), np.int32)
    max_new[:n] = N
    eos = np.full((B,), -1 if eos_id is None else int(eos_id), np.int32)

    def pad(vals, neutral):
        return list(vals) + [neutral] * (B - n)

    sampling = SamplingParams.make(B, pad(temps, 0.0), pad(top_ks, 0), pad(top_ps, 1.0),
                                   pad(min_ps, 0.0), pad(reps, 1.0))
    graphdef, params = nnx.split(model)
    n_steps = min(int(chunk), 1 << max(N - 2, 0).bit_length())  # no 32-step chunk for 3 tokens

    def run() -> Iterator[list[list[int]]]:
        cache = init_cache(cfg, B, S, model.dtype)
        tokens_d, lengths_d = jnp.asarray(tokens), jnp.asarray(lengths)
        first_BxV, cache = prefill(graphdef, params, tokens_d, lengths_d, cache)
        state, token_B = init_decode_state(
            first_BxV, cache, tokens_d, lengths_d, jnp.asarray(max_new), jnp.asarray(eos),
            jnp.asarray(ids + [0] * (B - n), jnp.int32), jax.random.key(int(seed)), sampling, flags=flags,
            windowed=windowed, history_len=bucket(P + N))
        yield _rows(np.asarray(token_B)[:n, None])
        produced = 1
        weights = decode_weights(graphdef, params, B == 1) if N > 1 else None
        while produced < N and not bool(np.asarray(state.done_B).all()):
            STATS["decode_calls"] += 1
            state, tokens_BxN = decode(graphdef, params, state, n_steps, weights=weights)
            produced += n_steps
            yield _rows(np.asarray(tokens_BxN)[:n])

    if stream:
        return run()
    out = [[] for _ in range(n)]
    for piece in run():
        for row, new in zip(out, piece):
            row.extend(new)
    return out


def _rows(tokens_nxN: np.ndarray) -> list[list[int]]:
    """Host view of a chunk: each row's real tokens (PAD dropped; a done row only emits PAD)."""
    return [[int(t) for t in row if t != PAD] for row in tokens_nxN]
