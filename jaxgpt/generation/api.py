"""Generation from Python: `generate()` (the host driver) and `logits()` (the plain forward).

`generate` validates its arguments, buckets the batch and lengths, and drives the jitted blocks
of jaxgpt/generation/engine.py: one prefill, then decode chunks until every row is done.
See `engine`'s module docstring for the design decisions (bucketing, donation, windowing).
"""

from __future__ import annotations

import functools
import numbers
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.errors import UserError
from jaxgpt.generation.engine import (DEFAULT_CHUNK, PAD, STATS, batch_bucket, bucket, decode,
                                      decode_weights, init_decode_state, prefill)
from jaxgpt.generation.sampling import SamplingFlags, SamplingParams
from jaxgpt.model import init_cache


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens_BxT):
    STATS["trace:logits"] += 1
    return nnx.merge(graphdef, params).logits(tokens_BxT)


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


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature=None,
             top_k=None, top_p=None, min_p=None, repetition_penalty=None, eos_id=None, seed: int = 0,
             stream: bool = False, chunk: int = DEFAULT_CHUNK, row_ids=None, draft=None,
             num_draft: int = 4, return_stats: bool = False, num_beams: int = 1,
             length_penalty=1.0, early_stopping=False, num_return_sequences: int = 1,
             return_scores: bool = False):
    """Continue each prompt by up to max_new_tokens tokens; returns the new tokens per prompt.

    prompts: token-id lists of any lengths (>= 1 token each; prompts longer than block_size
      keep their last block_size tokens). temperature 0 means greedy (None: 1.0). temperature, top_k,
      top_p, min_p and repetition_penalty take a scalar or a list with one value per prompt
      (None = off). With eos_id a row ends at, and includes, its first EOS.
    seed: one PRNG key for the call; row i draws from fold_in(key, row_ids[i]) (default
      row_ids = 0..n-1), so equal prompts give different samples, and a row generated alone
      with its row id reproduces the row generated in a batch.
    stream=True returns an iterator that yields, per decode chunk, a list (per prompt) of the
      tokens produced in that chunk. chunk: decode steps per jitted call.
    draft: a smaller model with the same vocabulary turns on exact speculative decoding
      (jaxgpt/generation/speculative.py): each round it proposes num_draft tokens per row and
      the model verifies them in one pass. Greedy output is token for token the model's own;
      sampled output follows exactly the model's filtered distribution (not the same samples
      as without a draft). return_stats=True (with a draft) returns (result, SpeculativeStats):
      its mean_accepted is the mean accepted draft tokens per round (a round emits that + 1).
    num_beams > 1: beam search with transformers' semantics (jaxgpt/generation/beam.py):
      length_penalty, early_stopping (False | True | "never") and num_return_sequences (<=
      num_beams) as in transformers' generate(num_beams=..., do_sample=False). It returns the
      num_return_sequences best hypotheses of each prompt, best first, as one list grouped by
      prompt (new tokens; a hypothesis ended by EOS includes it), and with return_scores=True
      (sequences, scores). It takes no sampling argument, no draft and no stream, and each
      prompt plus max_new_tokens must fit block_size.
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
    # --- beam search (jaxgpt/generation/beam.py)
    if not (isinstance(num_beams, numbers.Integral) and not isinstance(num_beams, bool) and num_beams >= 1):
        raise UserError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if num_beams > 1 or num_return_sequences != 1 or return_scores:
        return _beams(model, prompts, int(max_new_tokens), int(num_beams), eos_id=eos_id,
                      length_penalty=length_penalty, early_stopping=early_stopping,
                      num_return_sequences=num_return_sequences, return_scores=return_scores,
                      sampling_args=dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                         min_p=min_p, repetition_penalty=repetition_penalty,
                                         draft=draft),
                      stream=stream, chunk=chunk)
    # --- end beam search
    # --- speculative decoding: validation (jaxgpt/generation/speculative.py)
    if draft is not None:
        from jaxgpt.generation.speculative import check_draft
        check_draft(model, draft, num_draft)
    elif return_stats:
        raise UserError("return_stats=True needs a draft model (draft=...)")
    # --- end speculative decoding
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
    # --- speculative decoding: the same batch, decoded by draft/verify rounds
    if draft is not None:
        from jaxgpt.generation import speculative
        return speculative.run(
            model, draft, num_draft, tokens=tokens, lengths=lengths, max_new=max_new, eos=eos,
            row_ids=np.asarray(ids + [0] * (B - n), np.int32), sampling=sampling, flags=flags, n=n,
            P=P, N=N, S=S, windowed=windowed, seed=seed, stream=stream, chunk=chunk,
            return_stats=return_stats)
    # --- end speculative decoding
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
        weights = decode_weights(graphdef, params, B) if N > 1 else None
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


def _beams(model, prompts, N, K, *, eos_id, length_penalty, early_stopping, num_return_sequences,
           return_scores, sampling_args, stream, chunk):
    """generate()'s beam-search branch: validate, run, flatten (see generate's docstring)."""
    from jaxgpt.generation.beam import beam_search

    given = [name for name, v in sampling_args.items() if v is not None]
    if given:
        raise UserError(f"num_beams={K} is beam search (deterministic): it takes no {given[0]}")
    if stream:
        raise UserError(f"num_beams={K} cannot stream: beams are reordered until the search ends")
    if not (isinstance(num_return_sequences, numbers.Integral) and not isinstance(num_return_sequences, bool)
            and 1 <= num_return_sequences <= K):
        raise UserError(f"num_return_sequences must be an integer in [1, num_beams={K}], "
                        f"got {num_return_sequences!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, numbers.Real) \
            or not np.isfinite(length_penalty):
        raise UserError(f"length_penalty must be a finite number, got {length_penalty!r}")
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise UserError(f"early_stopping must be False, True or 'never', got {early_stopping!r}")
    bs = model.cfg.block_size
    for i, p in enumerate(prompts):
        if len(p) + N > bs:
            raise UserError(f"prompt {i} ({len(p)} tokens) + max_new_tokens={N} exceeds "
                            f"block_size={bs}: beam search does not slide past the window")
    seqs, scores = beam_search(model, prompts, N, K, length_penalty=float(length_penalty),
                               early_stopping=early_stopping, eos_id=eos_id,
                               num_return_sequences=num_return_sequences, chunk=chunk)
    flat = [s for row in seqs for s in row]
    return (flat, [x for row in scores for x in row]) if return_scores else flat


def _rows(tokens_nxN: np.ndarray) -> list[list[int]]:
    """Host view of a chunk: each row's real tokens (PAD dropped; a done row only emits PAD)."""
    return [[int(t) for t in row if t != PAD] for row in tokens_nxN]
