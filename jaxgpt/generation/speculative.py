"""Exact speculative decoding: a small draft model proposes, the target verifies k tokens per pass.

Shapes in names: B rows, k proposals per round (`num_draft`), S cache slots, V vocabulary,
M tokens one call can emit per row.

`jaxgpt.generate(model, prompts, n, draft=draft_model, num_draft=k, ...)` lands here (api.py
validates the arguments and builds the padded batch exactly as for plain generation). A row
holds n tokens (prompt + generated) and feeds its last one, token_B at position n - 1, at the
next pass, as in plain decode. One ROUND, for every row at once:
  1. draft: the draft model feeds the row's last two tokens (positions n-2, n-1; see "caches"),
     then proposes d_1..d_k, one cached decode step each, each drawn from its filtered
     distribution q_i (the argmax for greedy rows);
  2. verify: the target feeds [token, d_1..d_k] in ONE cached forward (`extend`, k + 1
     positions: the weights are read once), which gives p_1..p_{k+1}, the distribution plain
     `generate` would sample from
     at each position given the same prefix (same filters; the repetition penalty's presence
     set includes d_1..d_{i-1} for p_i and q_i);
  3. accept: d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)) (u * q < p), up to the
     first rejection; at a rejection at i the row draws from norm(max(0, p_i - q_i)); after
     accepting every proposal it draws a bonus token from p_{k+1}. The emitted tokens are
     distributed exactly as the target's own sampling (Leviathan et al. 2023, Chen et al. 2023).
     Greedy rows (p and q one-hot) accept d_i iff it is the target's argmax and then emit the
     target's argmax: token for token the target's greedy output.
  4. EOS and max_new_tokens cut the emitted tokens per row; the row's counters advance.
A row's round emits between 1 and k + 1 tokens; rows advance by different amounts and keep
their own lengths.

Design decisions:
- Caches: each model keeps its own KV cache with per-row lengths; slots past a row's length are
  never read, so ROLLBACK is setting the length: at the start of a round the target's length is
  n - 1 and the draft's n - 2 (every slot below holds the row's true tokens). The draft re-feeds
  the token before last: after a fully accepted round neither d_k nor the bonus token are in the
  draft's cache, and feeding two tokens per row always (one of them possibly a rewrite of an
  identical entry) keeps every row on one shape. Entries past the new lengths are overwritten
  by later rounds.
- One jitted call runs up to `n_rounds` rounds under `lax.while_loop` and stops as soon as every
  row is done (no wasted rounds at the end); the host only asks "all done?" between calls, as
  plain generate does. The k draft steps are unrolled (k is static); every shape is static.
  The emitted tokens go to a (B, M) buffer at each row's running offset, PAD elsewhere.
- Window: position n + i - 1 must be < S (cache slots; S <= block_size) for the target's cached
  logits at verify position i to hold, so a row verifies at most kb = min(k, S - n) proposals
  (fewer near the end of the cache: with kb proposals the bonus is drawn from p_{kb+1}, which is
  still the exact rule). A row whose next position is past S (only when prompt + new tokens
  exceed block_size) falls back to plain decoding: one token per round from a full forward over
  its last block_size tokens, exactly as plain generate's sliding window (under `lax.cond`, only
  when some row needs it). Such a round still pays the batched draft and verify passes.
- Randomness: row r's round draws from fold_in(fold_in(key, row_id), n_new), n_new = the tokens
  the row had generated when the round started (it grows every round, so no key is reused),
  folded with (0, i) for the i-th proposal, (1, i) for the i-th acceptance test and (2, 0) for the
  residual or bonus draw. The first token comes from the target's prefill exactly as in plain
  generate. Same seed and row ids, same output; rows do not depend on their batch mates.
  (Speculative sampling follows the target's distribution; it does not reproduce the very
  samples plain `generate` draws with the same seed.)
- Cost: a round reads the target's weights once (the k + 1 positions share one pass) and the
  draft's k times. Both models' per-layer weights are sliced once per generate call
  (`layer_weights`) and passed in: on XLA:CPU a slice of a stacked (L, ...) weight inside the
  loop is a fresh copy at every use (it made a 12 x 768 target's verify pass ~3x slower).
- A model is only its graphdef and params here: either model may be int8-quantized
  (jaxgpt/quant.py), use another dtype, or (the draft) a smaller block_size (its positions past
  it are clamped: worse proposals, still exact output). Only the vocabulary must match.
- Stats: per row, the rounds verified by the target, the proposals verified and the proposals
  accepted (before EOS / max_new_tokens cuts); `SpeculativeStats` sums them.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt import attention as attn
from jaxgpt.errors import UserError
from jaxgpt.generation.engine import PAD, STATS, DecodeState, bucket, init_decode_state, prefill
from jaxgpt.generation.sampling import (SamplingFlags, SamplingParams, _draw, apply_repetition_penalty,
                                        filtered_probs, first_argmax)
from jaxgpt.model import _block, _write_rows, init_cache

MAX_DRAFT = 64  # proposals per round: the draft steps are unrolled in the compiled round
MAX_ROUNDS = 8  # rounds per jitted call at most (its output buffer holds 8 (k + 1) tokens per row)


# ----------------------------------------------------------------------------- validation
def check_draft(model, draft, num_draft) -> None:
    """One-line UserErrors for a draft that cannot serve `model`, or a bad num_draft."""
    if isinstance(num_draft, bool) or not isinstance(num_draft, numbers.Integral) \
            or not 1 <= num_draft <= MAX_DRAFT:
        raise UserError(f"num_draft must be an integer in [1, {MAX_DRAFT}], got {num_draft!r}")
    cfg = getattr(draft, "cfg", None)
    if cfg is None or not hasattr(draft, "extend"):
        raise UserError(f"draft must be a jaxgpt model (from jaxgpt.load), got {type(draft).__name__}")
    if cfg.vocab_size != model.cfg.vocab_size:
        raise UserError(f"the draft's vocabulary ({cfg.vocab_size} ids) differs from the model's "
                        f"({model.cfg.vocab_size}); the draft must use the same tokenizer")


# ----------------------------------------------------------------------------- stats
@dataclasses.dataclass
class SpeculativeStats:
    """What the draft achieved, per prompt (lists) and overall (properties).

    rounds[i]: target passes that verified row i's proposals; proposed[i] / accepted[i]: draft
    tokens verified / accepted by the rule (before EOS and max_new_tokens cut a round short);
    window_tokens[i]: tokens made by the plain sliding-window fallback; calls: jitted calls.
    Filled as generation runs (also while streaming).
    """
    rounds: list = dataclasses.field(default_factory=list)
    proposed: list = dataclasses.field(default_factory=list)
    accepted: list = dataclasses.field(default_factory=list)
    window_tokens: list = dataclasses.field(default_factory=list)
    num_draft: int = 0
    calls: int = 0

    @property
    def mean_accepted(self) -> float:
        """Accepted draft tokens per round (per target pass and row); a round emits that + 1."""
        return sum(self.accepted) / max(sum(self.rounds), 1)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens, in [0, 1]."""
        return sum(self.accepted) / max(sum(self.proposed), 1)

    @property
    def tokens_per_round(self) -> float:
        return self.mean_accepted + 1.0

    def as_dict(self) -> dict:
        return {"mean_accepted": round(self.mean_accepted, 4),
                "acceptance_rate": round(self.acceptance_rate, 4),
                "tokens_per_round": round(self.tokens_per_round, 4), "rounds": sum(self.rounds),
                "num_draft": self.num_draft, "calls": self.calls}


# ----------------------------------------------------------------------------- state
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["base", "draft_cache", "prev_B", "rounds_B", "proposed_B", "accepted_B",
                 "window_B"],
    meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SpecState:
    """The plain decode state (target cache, counters, sampling, presence, history) plus the
    draft's cache, each row's token before last (prev_B, at position n - 2) and the stats."""
    base: DecodeState
    draft_cache: dict
    prev_B: jax.Array
    rounds_B: jax.Array
    proposed_B: jax.Array
    accepted_B: jax.Array
    window_B: jax.Array


def _greedy(logits_BxV, flags: SamplingFlags, params: SamplingParams, presence_BxV):
    """The argmax plain `sample` takes for greedy rows (after the repetition penalty)."""
    x = logits_BxV.astype(jnp.float32)
    if flags.repetition_penalty:
        x = apply_repetition_penalty(x, presence_BxV, params.repetition_penalty_B)
    return first_argmax(x, axis=-1)


def _row_keys(key, row_id_B, n_new_B):
    return jax.vmap(lambda r, s: jax.random.fold_in(jax.random.fold_in(key, r), s))(row_id_B, n_new_B)


def _draw_rows(keys_B, purpose: int, index: int, probs_BxV):
    """One token per row from probs_BxV (unnormalised is fine) with the row's round key."""
    logp = jnp.log(probs_BxV)  # zero mass -> -inf: never drawn (see sampling._draw)
    return jax.vmap(lambda k, x: _draw(k, purpose, index, x))(keys_B, logp)


def _mark(presence_BxV, tokens_B, on_B=None):
    rows_B = jnp.arange(tokens_B.shape[0])
    on = jnp.ones(tokens_B.shape, bool) if on_B is None else on_B
    return presence_BxV.at[rows_B, jnp.maximum(tokens_B, 0)].max(on)


def _extend(model, tokens_BxT, cache, layers):
    """`model.extend` with the per-layer weights sliced once by the caller (`layers`, as
    `decode_step` takes them). Inside a loop, `extend` would cut every stacked (L, ...) weight
    again per call, and on XLA:CPU each cut is a copy: a 12 x 768 target's verify pass took
    ~3x as long as with pre-sliced weights. Same computation as `GPT._cached_stack`; this
    helper goes away once `GPT.extend` takes `layers=` like `decode_step`."""
    cfg, dt = model.cfg, model.dtype
    T = tokens_BxT.shape[1]
    S = cache["k"][0].shape[1]
    start_B = cache["length"]
    slot_BxT = start_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    mask_BxTxS = jnp.arange(S, dtype=jnp.int32)[None, None, :] <= slot_BxT[:, :, None]
    x_BxTxD = model._embed(tokens_BxT, jnp.minimum(slot_BxT, cfg.block_size - 1), None)
    ks, vs = list(cache["k"]), list(cache["v"])
    for i, p in enumerate(layers):
        def attend(q, k, v, _key, i=i):
            ks[i], vs[i] = _write_rows(ks[i], k, start_B), _write_rows(vs[i], v, start_B)
            return attn.attend(q, ks[i], vs[i], backend=model.attention, mask_BxTxS=mask_BxTxS), None
        x_BxTxD, _ = _block(cfg, dt, p, x_BxTxD, attend, None)
    return model._final_norm(x_BxTxD), {"k": ks, "v": vs, "length": start_B + T}


def _accept(u, p_d, q_d):
    """The acceptance test: u < min(1, p(d) / q(d)) for u ~ U[0, 1), written without the division
    (q(d) > 0 for a d drawn from q). tests/test_speculative.py breaks it on purpose."""
    return u * q_d < p_d


def _residual(p_V, q_V):
    """What a rejected position draws from: max(0, p - q), normalised by the draw."""
    return jnp.maximum(p_V - q_V, 0.0)


def _round(t_model, d_model, t_layers, d_layers, st: SpecState, k: int):
    """One draft/verify/accept round for every row: (state, emitted_Bx(k+1), count_B)."""
    b = st.base
    flags, params = b.flags, b.sampling
    B = b.token_B.shape[0]
    S = b.cache["k"][0].shape[1]
    rows_B = jnp.arange(B)
    active_B = ~b.done_B
    n_B = b.n_B
    cached_B = n_B <= S  # the token to feed (position n - 1) fits the cache
    kb_B = jnp.clip(S - n_B, 0, k)  # proposals whose verify logits stay inside the cache
    keys_B = _row_keys(b.key, b.row_id_B, b.n_new_B)
    rep = flags.repetition_penalty

    # ---- 1. draft: re-feed (token before last, last token), then k proposals
    d_bs = d_model.cfg.block_size
    dcache = dict(st.draft_cache, length=jnp.maximum(n_B - 2, 0))  # n >= 2 on real rows
    h_Bx2xD, dcache = _extend(d_model, jnp.stack([st.prev_B, b.token_B], axis=1), dcache, d_layers)
    h_BxD = h_Bx2xD[:, 1]
    presence = b.presence_BxV
    drafts, qs, presences = [], [], [presence]
    for i in range(k):
        logits_BxV = d_model.head(h_BxD)
        if flags.sample:
            q_BxV = filtered_probs(logits_BxV, params, flags, presence)
            d_B = _draw_rows(keys_B, 0, i, q_BxV)
            qs.append(q_BxV)
        else:
            d_B = _greedy(logits_BxV, flags, params, presence)
        drafts.append(d_B)
        if rep:
            presence = _mark(presence, d_B)
            presences.append(presence)
        if i + 1 < k:  # d_{i+1} sits at position n + i
            pos_B = jnp.minimum(n_B + i, d_bs - 1)
            h_BxD, dcache = d_model.decode_step(d_B, pos_B, dcache, d_layers)
    drafts_Bxk = jnp.stack(drafts, axis=1)

    # ---- 2. verify: the target scores [token, d_1..d_k] in one cached pass
    tcache = dict(b.cache, length=jnp.maximum(n_B - 1, 0))
    feed_BxK1 = jnp.concatenate([b.token_B[:, None], drafts_Bxk], axis=1)
    h_BxK1xD, tcache = _extend(t_model, feed_BxK1, tcache, t_layers)
    logits_BxK1xV = t_model.head(h_BxK1xD)
    V = logits_BxK1xV.shape[-1]
    flat_logits = logits_BxK1xV.reshape(B * (k + 1), V)
    flat_params = jax.tree.map(lambda a: jnp.repeat(a, k + 1), params)
    flat_presence = jnp.stack(presences, axis=1).reshape(B * (k + 1), V) if rep else None

    # ---- 3. accept the longest prefix the rule lets through, then the residual / bonus draw
    allowed_Bxk = jnp.arange(k)[None, :] < kb_B[:, None]
    if flags.sample:
        p_BxK1xV = filtered_probs(flat_logits, flat_params, flags, flat_presence).reshape(B, k + 1, V)
        q_BxkxV = jnp.stack(qs, axis=1)
        p_d = jnp.take_along_axis(p_BxK1xV[:, :k], drafts_Bxk[..., None], axis=-1)[..., 0]
        q_d = jnp.take_along_axis(q_BxkxV, drafts_Bxk[..., None], axis=-1)[..., 0]
        u_Bxk = jax.vmap(lambda kk: jax.vmap(
            lambda i: jax.random.uniform(jax.random.fold_in(jax.random.fold_in(kk, 1), i)))(
                jnp.arange(k)))(keys_B)
        ok_Bxk = _accept(u_Bxk, p_d, q_d)
    else:
        target_BxK1 = _greedy(flat_logits, flags, flat_params, flat_presence).reshape(B, k + 1)
        ok_Bxk = drafts_Bxk == target_BxK1[:, :k]
    j_B = jnp.sum(jnp.cumprod(ok_Bxk & allowed_Bxk, axis=1), axis=1).astype(jnp.int32)
    if flags.sample:
        p_j = p_BxK1xV[rows_B, j_B]
        q_j = q_BxkxV[rows_B, jnp.minimum(j_B, k - 1)]
        resid = _residual(p_j, q_j)
        # A rejection (j < kb) draws from the residual; a row that used all kb proposals draws
        # its bonus from p. (A residual rounding to all zeros can only follow p ~= q: take p.)
        use_resid = (j_B < kb_B) & (jnp.sum(resid, axis=-1) > 0)
        final_B = _draw_rows(keys_B, 2, 0, jnp.where(use_resid[:, None], resid, p_j))
    else:
        final_B = target_BxK1[rows_B, j_B]

    if b.windowed:  # rows past the cache: one plain token from the sliding window
        W = t_model.cfg.block_size  # == S whenever a row can leave the cache (see generate)

        def window_logits():
            idx_BxW = jnp.maximum(n_B[:, None] - W, 0) + jnp.arange(W)[None, :]
            win_BxW = jnp.take_along_axis(b.history_BxN, idx_BxW, axis=1)
            return t_model.head(t_model.hidden_at(win_BxW, jnp.full((B,), W - 1)))

        need = jnp.any(active_B & ~cached_B)
        win_BxV = jax.lax.cond(need, window_logits, lambda: jnp.zeros((B, V), jnp.float32))
        if flags.sample:
            win_tok_B = _draw_rows(keys_B, 2, 0, filtered_probs(win_BxV, params, flags, b.presence_BxV))
        else:
            win_tok_B = _greedy(win_BxV, flags, params, b.presence_BxV)
        final_B = jnp.where(cached_B, final_B, win_tok_B)
        j_B = jnp.where(cached_B, j_B, 0)

    # ---- 4. emitted tokens: d_1..d_j then the final one, cut by max_new and EOS
    cols = jnp.arange(k + 1)[None, :]
    padded_Bxk1 = jnp.concatenate([drafts_Bxk, drafts_Bxk[:, :1]], axis=1)
    emit_Bxk1 = jnp.where(cols < j_B[:, None], padded_Bxk1, final_B[:, None])
    count_B = jnp.minimum(j_B + 1, b.max_new_B - b.n_new_B)
    eos_Bxk1 = (emit_Bxk1 == b.eos_B[:, None]) & (cols < count_B[:, None])
    hit_eos_B = jnp.any(eos_Bxk1, axis=1)
    count_B = jnp.where(hit_eos_B, jnp.argmax(eos_Bxk1, axis=1) + 1, count_B)
    count_B = jnp.where(active_B, count_B, 0)
    valid_Bxk1 = cols < count_B[:, None]
    emit_Bxk1 = jnp.where(valid_Bxk1, emit_Bxk1, PAD)

    n_new_B = b.n_new_B + count_B
    done_B = b.done_B | (active_B & (hit_eos_B | (n_new_B >= b.max_new_B)))
    last_B = emit_Bxk1[rows_B, jnp.maximum(count_B - 1, 0)]
    before_B = jnp.where(count_B >= 2, emit_Bxk1[rows_B, jnp.maximum(count_B - 2, 0)], b.token_B)
    moved_B = count_B > 0
    presence, history = b.presence_BxV, b.history_BxN
    if rep:
        for i in range(k + 1):
            presence = _mark(presence, emit_Bxk1[:, i], valid_Bxk1[:, i])
    if b.windowed:  # invalid entries write out of range (dropped)
        col_Bxk1 = jnp.where(valid_Bxk1, n_B[:, None] + cols, history.shape[1])
        history = history.at[rows_B[:, None], col_Bxk1].set(jnp.maximum(emit_Bxk1, 0), mode="drop")
    n_B = n_B + count_B
    # Rollback: each cache keeps exactly the row's accepted tokens (see the module docstring).
    tcache = dict(tcache, length=jnp.maximum(n_B - 1, 0))
    dcache = dict(dcache, length=jnp.maximum(n_B - 2, 0))
    base = dataclasses.replace(
        b, cache=tcache, token_B=jnp.where(moved_B, last_B, b.token_B), n_B=n_B, n_new_B=n_new_B,
        done_B=done_B, presence_BxV=presence, history_BxN=history)
    verified_B = active_B & cached_B
    new = SpecState(
        base=base, draft_cache=dcache, prev_B=jnp.where(moved_B, before_B, st.prev_B),
        rounds_B=st.rounds_B + verified_B, proposed_B=st.proposed_B + jnp.where(verified_B, kb_B, 0),
        accepted_B=st.accepted_B + jnp.where(verified_B, j_B, 0),
        window_B=st.window_B + (active_B & ~cached_B))
    return new, emit_Bxk1, count_B


@functools.partial(jax.jit, static_argnums=0)
def layer_weights(graphdef, params):
    """`layer_params()` of a split model: the per-layer weights a round reads, built once per
    generate call (a slice of a stacked weight inside the loop would be a copy per use)."""
    return nnx.merge(graphdef, params).layer_params()


@functools.partial(jax.jit, static_argnums=(0, 3, 8), donate_argnums=6)
def _rounds(t_graphdef, t_params, t_layers, d_graphdef, d_params, d_layers, state: SpecState,
            n_rounds, k: int):
    """Up to n_rounds (<= MAX_ROUNDS, traced: no recompile per chunk size) rounds, fewer once
    every row is done: (state, tokens_BxM), PAD-filled. *_layers: `layer_weights`."""
    STATS["trace:speculative"] += 1
    t_model, d_model = nnx.merge(t_graphdef, t_params), nnx.merge(d_graphdef, d_params)
    B = state.prev_B.shape[0]
    M = MAX_ROUNDS * (k + 1)
    rows_B = jnp.arange(B)

    def cond(carry):
        st, _, _, r = carry
        return (r < n_rounds) & jnp.any(~st.base.done_B)

    def body(carry):
        st, out_BxM, col_B, r = carry
        st, emit_Bxk1, count_B = _round(t_model, d_model, t_layers, d_layers, st, k)
        cols_Bxk1 = jnp.where(emit_Bxk1 != PAD, col_B[:, None] + jnp.arange(k + 1)[None, :], M)
        out_BxM = out_BxM.at[rows_B[:, None], cols_Bxk1].set(emit_Bxk1, mode="drop")
        return st, out_BxM, col_B + count_B, r + 1

    out = jnp.full((B, M), PAD, jnp.int32)
    state, out, _, _ = jax.lax.while_loop(cond, body, (state, out, jnp.zeros((B,), jnp.int32), 0))
    return state, out


@functools.partial(jax.jit, donate_argnums=0)
def _start_state(base: DecodeState, draft_cache, prev_B):
    zeros = jnp.zeros_like(prev_B)
    return SpecState(base=base, draft_cache=draft_cache, prev_B=prev_B, rounds_B=zeros,
                     proposed_B=zeros, accepted_B=zeros, window_B=zeros)


# ----------------------------------------------------------------------------- host driver
def run(model, draft, num_draft: int, *, tokens, lengths, max_new, eos, row_ids, sampling, flags,
        n: int, P: int, N: int, S: int, windowed: bool, seed: int, stream: bool, chunk: int,
        return_stats: bool):
    """The speculative counterpart of api.generate's decode loop, on the batch api.generate
    built (tokens (B, T) right-padded, lengths, max_new, eos, row_ids: numpy, B rows of which
    the first n are real). Same return conventions, plus the stats when return_stats."""
    B = tokens.shape[0]
    k = int(num_draft)
    # Rounds per call: about `chunk` tokens per row when every proposal is accepted (at most
    # MAX_ROUNDS); the loop inside stops early once every row is done.
    n_rounds = jnp.int32(min(MAX_ROUNDS, max(1, -(-int(chunk) // (k + 1)))))
    stats = SpeculativeStats(num_draft=k)
    t_graphdef, t_params = nnx.split(model)
    d_graphdef, d_params = nnx.split(draft)

    def update(state):
        for name in ("rounds", "proposed", "accepted", "window"):
            field = "window_tokens" if name == "window" else name
            setattr(stats, field, np.asarray(getattr(state, name + "_B"))[:n].tolist())

    def gen() -> Iterator[list[list[int]]]:
        tokens_d, lengths_d = jnp.asarray(tokens), jnp.asarray(lengths)
        first_BxV, cache = prefill(t_graphdef, t_params, tokens_d, lengths_d,
                                   init_cache(model.cfg, B, S, model.dtype))
        _, draft_cache = prefill(d_graphdef, d_params, tokens_d, lengths_d,
                                 init_cache(draft.cfg, B, S, draft.dtype))
        base, token_B = init_decode_state(
            first_BxV, cache, tokens_d, lengths_d, jnp.asarray(max_new), jnp.asarray(eos),
            jnp.asarray(row_ids, jnp.int32), jax.random.key(int(seed)), sampling, flags=flags,
            windowed=windowed, history_len=bucket(P + N))
        prev_B = jnp.asarray(tokens[np.arange(B), lengths - 1])
        state = _start_state(base, draft_cache, prev_B)
        t_layers, d_layers = layer_weights(t_graphdef, t_params), layer_weights(d_graphdef, d_params)
        yield [[int(t)] if t != PAD else [] for t in np.asarray(token_B)[:n]]
        update(state)
        while not bool(np.asarray(state.base.done_B).all()):
            STATS["speculative_calls"] += 1
            stats.calls += 1
            state, tokens_BxM = _rounds(t_graphdef, t_params, t_layers, d_graphdef, d_params, d_layers,
                                        state, n_rounds, k)
            update(state)
            yield [[int(t) for t in row if t != PAD] for row in np.asarray(tokens_BxM)[:n]]

    if stream:
        return (gen(), stats) if return_stats else gen()
    out = [[] for _ in range(n)]
    for piece in gen():
        for row, new in zip(out, piece):
            row.extend(new)
    return (out, stats) if return_stats else out
