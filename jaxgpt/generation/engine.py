"""Jitted generation blocks: one prefill pass, then `lax.scan` decode chunks over a KV cache.

Shapes in names: B rows (batch bucket), T prompt bucket, S cache slots, N steps, V vocabulary.

The pieces, usable on their own by callers that drive their own loop:
  prefill(graphdef, params, tokens_BxT, lengths_B, cache) -> (logits_BxV, cache)
  init_decode_state(logits_BxV, cache, tokens_BxT, lengths_B, ...) -> (DecodeState, token_B)
  decode(graphdef, params, state, n_steps, weights=None) -> (state, tokens_BxN)
  decode_weights(graphdef, params, rows) -> weights (build once, pass to every decode call)
`jaxgpt.generation.api.generate()` wires them together.

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

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.generation.sampling import SamplingFlags, SamplingParams, sample
from jaxgpt.kernels import cpu_decode

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

    cache: the KV cache, (B, S, H, K) per layer as `init_cache` and `prefill` make it (with the
      cpu backend each `decode` call works on a head-major copy and writes it back: the
      cache's memory twice while it runs); cache["length"][b] = slots row b has filled
      (= n_B[b] - 1 while the row is inside the window: the last token is fed at the next step).
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
    # Only the last real token's logits are needed: T x V of head matmul would be wasted.
    last_BxD, cache = model.prefill(tokens_BxT, lengths_B, cache)
    return model.head(last_BxD), cache


@functools.partial(jax.jit, static_argnames=("flags", "windowed", "history_len"),
                   donate_argnames=("cache",))
def init_decode_state(logits_BxV, cache, tokens_BxT, lengths_B, max_new_B, eos_B, row_id_B, key,
                      sampling: SamplingParams, *, flags: SamplingFlags, windowed: bool,
                      history_len: int):
    """Build the decode state after `prefill` and sample each row's first new token (step 0).

    max_new_B: tokens each row may generate (0 for dummy rows: they start done).
    eos_B: EOS id per row or -1. row_id_B: each row's index in the caller's list (randomness).
    key: a PRNG key (`jax.random.key(seed)`). sampling/flags: see `jaxgpt.generation.sampling`.
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


def _decode_step(model, state: DecodeState, weights):
    """Feed each row's last token, sample the next. Returns (state, token_B, logits_BxV)."""
    cache = state.cache  # head-major with the cpu backend: see _decode_loop
    S = cache["k"][0].shape[2 if model.attention == "cpu" else 1]
    active_B = ~state.done_B
    pos_B = state.n_B - 1  # true position of the token being fed
    in_window_B = pos_B < S  # S < block_size implies every position fits (see generate)
    pos_B = jnp.minimum(pos_B, S - 1)
    if model.attention == "cpu":
        h_BxD, new_cache = cpu_decode.decode_step(model, state.token_B, pos_B, cache, weights)
        logits_BxV, greedy_B = cpu_decode.head(model, h_BxD, weights)
    else:
        h_BxD, new_cache = model.decode_step(state.token_B, pos_B, cache, weights["layers"])
        logits_BxV, greedy_B = model.head(h_BxD), None
    if state.windowed:
        W = model.cfg.block_size  # == S whenever a row can leave the window

        def window_logits():
            # The last W tokens of each row at positions 0..W-1: a full no-cache forward.
            idx_BxW = jnp.maximum(state.n_B[:, None] - W, 0) + jnp.arange(W)[None, :]
            win_BxW = jnp.take_along_axis(state.history_BxN, idx_BxW, axis=1)
            return model.head(model.hidden_at(win_BxW, jnp.full(win_BxW.shape[:1], W - 1)))

        need = jnp.any(active_B & ~in_window_B)
        slid_BxV = jax.lax.cond(need, window_logits, lambda: jnp.zeros_like(logits_BxV))
        logits_BxV = jnp.where(in_window_B[:, None], logits_BxV, slid_BxV)
        greedy_B = None  # the window's rows have other logits
    # Done rows and rows past the window keep their length: their slot write (at `length`,
    # or dropped when that is S) touches only slots they never read again.
    advance_B = active_B & in_window_B
    new_cache = dict(new_cache, length=jnp.where(advance_B, cache["length"] + 1, cache["length"]))
    state, token_B = _advance(dataclasses.replace(state, cache=new_cache), logits_BxV, active_B, greedy_B)
    return state, token_B, logits_BxV


@functools.partial(jax.jit, static_argnums=(0, 2))
def decode_weights(graphdef, params, rows: int):
    """The weights decode's loop reads, for a batch of `rows` rows; `generate` builds them once.

    Per-layer copies of the block parameters (matrices in the compute dtype), and with the cpu
    backend its layouts (see jaxgpt/kernels/cpu_decode.py). Built once instead of once per token:
    a static slice of a stacked (L, ...) weight is a fresh copy before each dot on XLA:CPU, i.e.
    every weight would be read twice and written once per token.
    """
    STATS["trace:decode_weights"] += 1
    model = nnx.merge(graphdef, params)
    layers = model.layer_params()
    if model.attention == "cpu":
        return cpu_decode.prepare(layers, model.wte[...], rows, model.dtype)
    return {"layers": layers}


@functools.partial(jax.jit, static_argnums=(0, 4), static_argnames=("return_logits",),
                   donate_argnums=3)
def _decode_loop(graphdef, params, weights, state: DecodeState, n_steps: int,
                 return_logits: bool = False):
    STATS["trace:decode"] += 1
    model = nnx.merge(graphdef, params)
    head_major = model.attention == "cpu"

    def body(st, _):
        st, token_B, logits_BxV = _decode_step(model, st, weights)
        return st, (token_B, logits_BxV if return_logits else None)

    # The cpu backend steps on a head-major copy of the cache, (B, H, S, K) per layer (see
    # jaxgpt/kernels/cpu_decode.py). The state keeps the (B, S, H, K) layout of prefill and
    # `init_cache` between calls, so the two transposes are paid once per call, not per token.
    if head_major:
        state = dataclasses.replace(state, cache=cpu_decode.to_head_major(state.cache))
    state, (tokens_NxB, logits_NxBxV) = jax.lax.scan(body, state, None, length=n_steps)
    if head_major:
        state = dataclasses.replace(state, cache=cpu_decode.from_head_major(state.cache))
    if return_logits:
        return state, tokens_NxB.T, jnp.swapaxes(logits_NxBxV, 0, 1)
    return state, tokens_NxB.T


def decode(graphdef, params, state: DecodeState, n_steps: int, return_logits: bool = False,
           weights=None):
    """Run n_steps decode steps under `lax.scan` (one compiled program per n_steps).

    graphdef, params: `nnx.split(model)`. state: from `init_decode_state` or a previous call;
    DONATED (the cache is updated in place; use the returned state).
    weights: `decode_weights(graphdef, params, B)`, to reuse across calls (else built per call).
    Returns (state, tokens_BxN) with PAD where a row was done, or with return_logits
    (state, tokens_BxN, logits_BxNxV): the logits each token was sampled from (before the
    sampling filters), for tests and scoring.
    """
    if weights is None:
        weights = decode_weights(graphdef, params, state.token_B.shape[0])
    return _decode_loop(graphdef, params, weights, state, n_steps, return_logits=return_logits)


