"""Beam search: B prompts x K beams in one jitted program, with transformers' semantics.

Shapes in names: B prompts (batch bucket), K beams, C = keep candidates per step, V real
vocabulary, N new-token budget, S cache slots.

Semantics are those of transformers' `GPT2LMHeadModel.generate(num_beams=K, do_sample=False)`
(its vectorised `_beam_search`, transformers 5.x; docs/beam_search_semantics.md has the rules
and where transformers implements them), for each prompt on its own:
- Beams start as K copies of the prompt, scored 0, -1e9, ..., -1e9, so the first step expands
  the prompt once, not K times.
- Each step scores every (beam, token) by the beam's summed log-probability plus the token's
  log_softmax over the whole real vocabulary, and keeps the C = max(2, 1 + #eos) * K best.
- A candidate "finishes" when its token is an EOS id, or at the last allowed step. Finished
  candidates ranked < K among the C enter the list of finished hypotheses (K slots) with score
  sum_logprobs / new_tokens ** length_penalty (new tokens counted with the EOS); the list keeps
  the K best it has ever been offered. While early_stopping=True and the list is full, or once
  the search cannot improve it, nothing more is admitted.
- The K best candidates that did not finish continue (a finished one can only continue with its
  score lowered by 1e9, when fewer than K unfinished candidates exist).
- The search ends when every candidate finishes (the last step), when early_stopping=True and
  the list holds K hypotheses, or when the best running beam cannot beat the worst finished
  hypothesis: its score if it ended now (early_stopping False), or, for "never" with a positive
  length_penalty, if it ran to max_new_tokens.
- The result is the num_return_sequences best finished hypotheses, best first; sequences_scores
  are their scores.
Ties between equal scores go to the lower index (beam * V + token, then finished-list order),
as `lax.top_k` orders them; transformers leaves exact ties unspecified. The EOS ids, the length
penalty and the early-stopping rule are per prompt (arrays), so one program serves a batch of
prompts with different settings; only K, the token budget and the number of EOS ids are static.
With E EOS ids the step keeps max(2, 1 + E) * K candidates for every prompt, which for a prompt
with fewer ids selects exactly what transformers' smaller candidate set selects: a beam has at
most one candidate per EOS id, so the K best unfinished candidates are always among them.

Machinery (why it is shaped like this):
- The prompt is prefilled once per prompt; its cache rows are then copied to its K beams.
- Decode runs under `lax.scan` in chunks of steps, like plain generation; after each step every
  layer's cache is reordered by beam parent with one gather over the row axis, on the device. A
  prompt whose search has ended stops changing (its state is frozen by a select); between
  chunks the host stops when every prompt has ended.
- Prompts of different lengths are exact: every row keeps its own length and positions, so a
  prompt's beams never see another prompt's padding, and a batch gives what each prompt gives
  alone.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.generation.engine import STATS, batch_bucket, bucket, decode_weights, prefill
from jaxgpt.kernels import cpu_decode
from jaxgpt.model import init_cache

NEG = -1.0e9  # transformers' additive "impossible" score


EARLY = {False: 0, True: 1, "never": 2}  # early_stopping modes as per-prompt integers


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["cache", "run_tokens_BxKxN", "run_scores_BxK", "last_BxK", "fin_tokens_BxKxN",
                 "fin_scores_BxK", "fin_done_BxK", "fin_len_BxK", "may_improve_B", "ended_B",
                 "n_new", "prompt_len_B", "eos_BxE", "length_penalty_B", "early_B"],
    meta_fields=["K", "N"])
@dataclasses.dataclass(frozen=True)
class BeamState:
    """The search's state; a pytree donated to every chunk. Rows of the cache are (b * K + k).

    run_*: the K running beams (their new tokens, summed log-probs, last token); fin_*: the K
    finished-hypothesis slots (new tokens, normalised scores, filled?, length); may_improve_B:
    transformers' "the list can still improve"; ended_B: the prompt's search is over;
    n_new: new tokens per running beam so far (one step count for all prompts); eos_BxE: each
    prompt's EOS ids (-1 pads); length_penalty_B; early_B: `EARLY`'s code of early_stopping.
    """
    cache: dict
    run_tokens_BxKxN: jax.Array
    run_scores_BxK: jax.Array
    last_BxK: jax.Array
    fin_tokens_BxKxN: jax.Array
    fin_scores_BxK: jax.Array
    fin_done_BxK: jax.Array
    fin_len_BxK: jax.Array
    may_improve_B: jax.Array
    ended_B: jax.Array
    n_new: jax.Array
    prompt_len_B: jax.Array
    eos_BxE: jax.Array
    length_penalty_B: jax.Array
    early_B: jax.Array
    K: int = 1
    N: int = 1


def _step(state: BeamState, logits_BxKxV) -> BeamState:
    """One beam-search step from the running beams' next-token logits (the rules above)."""
    K, N = state.K, state.N
    B, _, V = logits_BxKxV.shape
    C = max(2, 1 + state.eos_BxE.shape[1]) * K
    lp_Bx1 = state.length_penalty_B[:, None]
    stop_when_full_B, never_B = state.early_B == 1, state.early_B == 2
    logp_BxKxV = jax.nn.log_softmax(logits_BxKxV.astype(jnp.float32), axis=-1)
    total_BxKV = (logp_BxKxV + state.run_scores_BxK[:, :, None]).reshape(B, K * V)
    c_score_BxC, idx_BxC = jax.lax.top_k(total_BxKV, C)
    c_beam_BxC, c_tok_BxC = idx_BxC // V, idx_BxC % V
    n_new = state.n_new + 1  # tokens of every candidate, this one included
    last_step = n_new >= N
    c_hit_BxC = last_step | jnp.any(c_tok_BxC[:, :, None] == state.eos_BxE[:, None, :], axis=2)
    # each candidate's tokens: its parent's, with the new token at position n_new - 1
    parent_tokens = jnp.take_along_axis(state.run_tokens_BxKxN, c_beam_BxC[:, :, None], axis=1)
    c_tokens_BxCxN = jax.lax.dynamic_update_slice_in_dim(
        parent_tokens, c_tok_BxC[:, :, None], state.n_new, axis=2)

    # -- the K continuing beams: the best candidates that did not finish
    cont_score = c_score_BxC + NEG * c_hit_BxC
    run_scores, order_BxK = jax.lax.top_k(cont_score, K)
    parent_BxK = jnp.take_along_axis(c_beam_BxC, order_BxK, axis=1)
    run_tokens = jnp.take_along_axis(c_tokens_BxCxN, order_BxK[:, :, None], axis=1)
    last = jnp.take_along_axis(c_tok_BxC, order_BxK, axis=1)

    # -- finished hypotheses: candidates ranked < K that finished, unless admission is closed
    norm_BxC = c_score_BxC / (n_new.astype(jnp.float32) ** lp_Bx1)
    just_done = c_hit_BxC & (jnp.arange(C) < K)[None, :]
    blocked_B = ~state.may_improve_B | (stop_when_full_B & jnp.all(state.fin_done_BxK, axis=1))
    cand = norm_BxC + NEG * blocked_B[:, None] + NEG * ~just_done
    m_scores = jnp.concatenate([state.fin_scores_BxK, cand], axis=1)
    best_scores, sel_BxK = jax.lax.top_k(m_scores, K)

    def pick(fin, new):
        both = jnp.concatenate([fin, new], axis=1)
        return jnp.take_along_axis(both, sel_BxK.reshape(sel_BxK.shape + (1,) * (both.ndim - 2)), axis=1)

    fin_tokens = pick(state.fin_tokens_BxKxN, c_tokens_BxCxN)
    fin_done = pick(state.fin_done_BxK, just_done)
    fin_len = pick(state.fin_len_BxK, jnp.broadcast_to(n_new, c_tok_BxC.shape).astype(jnp.int32))

    # -- can the search still improve the finished list?
    # "never" with a positive penalty: the best beam if it ran to the budget (longest is best)
    hyp_len_B = jnp.where(never_B & (state.length_penalty_B > 0.0), jnp.float32(N),
                          n_new.astype(jnp.float32))
    best_possible_B = run_scores[:, 0] / hyp_len_B ** state.length_penalty_B
    worst_BxK = jnp.where(fin_done, jnp.min(best_scores, axis=1, keepdims=True), NEG)
    may_improve = state.may_improve_B & jnp.any(best_possible_B[:, None] > worst_BxK, axis=1)
    ended = ~may_improve | jnp.all(c_hit_BxC, axis=1) | (stop_when_full_B & jnp.all(fin_done, axis=1))

    new = dataclasses.replace(
        state, run_tokens_BxKxN=run_tokens, run_scores_BxK=run_scores, last_BxK=last,
        fin_tokens_BxKxN=fin_tokens, fin_scores_BxK=best_scores, fin_done_BxK=fin_done,
        fin_len_BxK=fin_len, may_improve_B=may_improve, ended_B=state.ended_B | ended, n_new=n_new)
    # A prompt whose search had already ended keeps its state (the other prompts go on).
    keep = state.ended_B

    def freeze(old, upd):
        return jnp.where(keep.reshape(keep.shape + (1,) * (old.ndim - 1)), old, upd)

    frozen = {f: freeze(getattr(state, f), getattr(new, f)) for f in
              ("run_tokens_BxKxN", "run_scores_BxK", "last_BxK", "fin_tokens_BxKxN",
               "fin_scores_BxK", "fin_done_BxK", "fin_len_BxK", "may_improve_B")}
    new = dataclasses.replace(new, **frozen)
    # rows of the cache follow their new parent: row b*K + k reads row b*K + parent[b, k]
    rows = (jnp.arange(B)[:, None] * K + jnp.where(keep[:, None], jnp.arange(K)[None, :], parent_BxK)).reshape(-1)
    return new, rows


@functools.partial(jax.jit, static_argnames=("K", "N"))
def _start(logits_BxV, cache, prompt_len_B, eos_BxE, length_penalty_B, early_B, *, K, N):
    """The first step, from the prompts' last logits: its K beams' caches are copies of the
    prompt's row (prefilled once)."""
    STATS["trace:beam_start"] += 1
    B = logits_BxV.shape[0]
    cache = jax.tree.map(lambda a: jnp.repeat(a, K, axis=0), cache)
    state = BeamState(
        cache=cache, run_tokens_BxKxN=jnp.zeros((B, K, N), jnp.int32),
        run_scores_BxK=jnp.full((B, K), NEG, jnp.float32).at[:, 0].set(0.0),
        last_BxK=jnp.zeros((B, K), jnp.int32), fin_tokens_BxKxN=jnp.zeros((B, K, N), jnp.int32),
        fin_scores_BxK=jnp.full((B, K), NEG, jnp.float32), fin_done_BxK=jnp.zeros((B, K), bool),
        fin_len_BxK=jnp.ones((B, K), jnp.int32), may_improve_B=jnp.ones((B,), bool),
        ended_B=jnp.zeros((B,), bool), n_new=jnp.zeros((), jnp.int32), prompt_len_B=prompt_len_B,
        eos_BxE=eos_BxE, length_penalty_B=length_penalty_B.astype(jnp.float32), early_B=early_B,
        K=K, N=N)
    state, _ = _step(state, jnp.broadcast_to(logits_BxV[:, None], (B, K, logits_BxV.shape[-1])))
    # all K rows of a prompt hold the same cache: no reorder needed after the first step
    return state


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=3)
def _chunk(graphdef, params, weights, state: BeamState, n_steps: int):
    """n_steps beam steps under lax.scan: feed each beam's last token, score, reorder caches."""
    STATS["trace:beam_chunk"] += 1
    model = nnx.merge(graphdef, params)
    head_major = model.attention == "cpu"
    B, K = state.last_BxK.shape

    def body(st: BeamState, _):
        cache = st.cache
        pos = jnp.repeat(st.prompt_len_B, K) + st.n_new - 1  # the fed token's true position
        pos = jnp.minimum(pos, model.cfg.block_size - 1)
        token = st.last_BxK.reshape(-1)
        if head_major:
            h, cache = cpu_decode.decode_step(model, token, pos, cache, weights)
            logits, _ = cpu_decode.head(model, h, weights)
        else:
            h, cache = model.decode_step(token, pos, cache, weights["layers"])
            logits = model.head(h)
        st, rows = _step(dataclasses.replace(st, cache=cache), logits.reshape(B, K, -1))
        gathered = jax.tree.map(lambda a: a[rows], {"k": st.cache["k"], "v": st.cache["v"]})
        return dataclasses.replace(st, cache=dict(st.cache, **gathered)), None

    if head_major:
        state = dataclasses.replace(state, cache=cpu_decode.to_head_major(state.cache))
    state, _ = jax.lax.scan(body, state, None, length=n_steps)
    if head_major:
        state = dataclasses.replace(state, cache=cpu_decode.from_head_major(state.cache))
    return state


def _ids(e) -> tuple:
    """None, an id, or several ids -> a sorted tuple of ids."""
    if e is None:
        return ()
    return tuple(sorted({int(x) for x in (e if isinstance(e, (list, tuple, np.ndarray)) else [e])}))


def beam_search(model, prompts, max_new_tokens: int, num_beams: int, *, length_penalty=1.0,
                early_stopping=False, num_return_sequences: int = 1, eos_id=None,
                eos_per_prompt=None, chunk: int = 32):
    """(sequences, scores): for each prompt its num_return_sequences best hypotheses, best first
    (new tokens only, an EOS that ended one included), and their scores.

    eos_id: None, an id or a list of ids, for every prompt (or eos_per_prompt: one such value per
    prompt). length_penalty and early_stopping (False | True | "never") take one value or a list
    with one per prompt. Arguments are assumed validated (see `jaxgpt.generation.api.generate`);
    each prompt fits block_size with its new tokens (beam search does not slide past the window).
    """
    cfg = model.cfg
    n, K, N = len(prompts), int(num_beams), int(max_new_tokens)

    def per_prompt(v):
        return list(v) if isinstance(v, (list, tuple)) else [v] * n

    eos_sets = [_ids(e) for e in (eos_per_prompt if eos_per_prompt is not None else [eos_id] * n)]
    E = max(len(e) for e in eos_sets)
    P = max(len(p) for p in prompts)
    B, T = batch_bucket(n), bucket(P)
    S = bucket(P + N)
    tokens = np.zeros((B, T), np.int32)
    lengths = np.ones((B,), np.int32)
    eos = np.full((B, E), -1, np.int32)
    lp = np.ones((B,), np.float32)
    early = np.zeros((B,), np.int32)
    for i, (p, e, l, es) in enumerate(zip(prompts, eos_sets, per_prompt(length_penalty),
                                          per_prompt(early_stopping))):
        tokens[i, :len(p)] = p
        lengths[i] = len(p)
        eos[i, :len(e)] = e
        lp[i], early[i] = l, EARLY[es]
    graphdef, params = nnx.split(model)
    logits, cache = prefill(graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths),
                            init_cache(cfg, B, S, model.dtype))
    state = _start(logits, cache, jnp.asarray(lengths), jnp.asarray(eos), jnp.asarray(lp),
                   jnp.asarray(early), K=K, N=N)
    if N > 1:
        weights = decode_weights(graphdef, params, B * K)
        steps = min(int(chunk), N - 1)
        done = 1
        while done < N and not bool(np.asarray(state.ended_B)[:n].all()):
            state = _chunk(graphdef, params, weights, state, steps)
            done += steps
    toks = np.asarray(state.fin_tokens_BxKxN)
    lens = np.asarray(state.fin_len_BxK)
    scores = np.asarray(state.fin_scores_BxK)
    m = int(num_return_sequences)
    seqs = [[toks[b, j, :lens[b, j]].tolist() for j in range(m)] for b in range(n)]
    return seqs, [scores[b, :m].tolist() for b in range(n)]
