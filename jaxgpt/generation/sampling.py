"""Per-row sampling: repetition penalty, temperature, top-k, top-p, min-p, greedy.

Shapes in names: B rows, V real vocabulary.

Every knob is a (B,) array, so one compiled program serves a batch whose rows ask for different
settings. Which filters exist in the program at all is static (`SamplingFlags`): a top-k or top-p
filter costs 32 passes over the vocabulary per step, so a batch where no row asks for it must not
pay for it.
A row opts out of a filter that is compiled in with its neutral value:
    temperature 0 -> greedy (argmax of the penalised logits; the filters never drop the argmax)
    top_k 0 -> no top-k, top_p 1 -> no top-p, min_p 0 -> no min-p, repetition_penalty 1 -> none.

Order (documented because it changes the result): repetition penalty on the raw logits, then
temperature, then top-k, top-p and min-p on the tempered distribution. Every filter keeps the
tokens whose tempered logit is >= a per-row threshold, so tied logits are kept or dropped
together and the kept support is a pure function of the logits (the property tests rely on it).

Randomness: a row's key is fold_in(fold_in(key, row_id), step), where row_id is the row's index
in the caller's prompt list and step counts that row's generated tokens. So a row's samples do
not depend on which other rows share its batch, on the batch bucket, or on the decode chunking.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingFlags:
    """What is compiled in (static: hashable, part of the jit cache key).

    sample: some row has temperature > 0 (else every row is greedy: no random draw at all).
    """
    sample: bool = True
    top_k: bool = False
    top_p: bool = False
    min_p: bool = False
    repetition_penalty: bool = False


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-row knobs, each (B,). Neutral values switch a compiled-in filter off for a row."""
    temperature_B: jax.Array  # float32; 0 = greedy
    top_k_B: jax.Array  # int32; 0 = off
    top_p_B: jax.Array  # float32; 1 = off
    min_p_B: jax.Array  # float32; 0 = off
    repetition_penalty_B: jax.Array  # float32; 1 = off

    @staticmethod
    def make(batch: int, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0):
        """Broadcast scalars or (B,) sequences to (B,) arrays (values are assumed validated)."""
        def arr(v, dt):
            return jnp.broadcast_to(jnp.asarray(v, dt), (batch,))
        return SamplingParams(arr(temperature, jnp.float32), arr(top_k, jnp.int32),
                              arr(top_p, jnp.float32), arr(min_p, jnp.float32),
                              arr(repetition_penalty, jnp.float32))


def apply_repetition_penalty(logits_BxV, presence_BxV, penalty_B):
    """CTRL-style: a seen token's positive logit is divided by the penalty, a negative one multiplied.

    presence_BxV is True for the tokens in the row's prompt and its generated tokens so far.
    """
    r = penalty_B[:, None]
    penalised = jnp.where(logits_BxV > 0, logits_BxV / r, logits_BxV * r)
    return jnp.where(presence_BxV, penalised, logits_BxV)


def _ordered_keys(x):
    """uint32 keys with the order of the float32 values (-inf lowest), so that a threshold can be
    searched exactly by bisection over 2**32 integers instead of over floats."""
    x = x.astype(jnp.float32)
    x = jnp.where(x == 0, jnp.float32(0), x)  # -0.0 == 0.0 as floats: one key for both
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _bisect(pred, lo_B, hi_B, largest: bool):
    """Per row, the smallest (or largest) uint32 t in [lo, hi] with pred(t) true, for a pred that
    is monotone in t (true on [answer, hi], or on [lo, answer]). 32 halvings cover all of uint32:
    exact, and no sort. Each halving costs one pass over the (B, V) logits."""
    def body(_, lo_hi):
        lo, hi = lo_hi
        if largest:  # invariant: pred(lo); the answer is in [lo, hi]
            mid = lo + (hi - lo - 1) // 2 + 1
            ok = pred(mid) & (hi > lo)
            return jnp.where(ok, mid, lo), jnp.where(ok | (hi <= lo), hi, mid - 1)
        mid = lo + (hi - lo) // 2  # invariant: pred(hi); the answer is in [lo, hi]
        ok = pred(mid)
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)
    lo, hi = jax.lax.fori_loop(0, 32, body, (lo_B, hi_B))
    return lo if largest else hi


def filter_logits(x_BxV, params: SamplingParams, flags: SamplingFlags):
    """Tempered logits with the dropped tokens set to -inf (top-k, then top-p, then min-p).

    x_BxV must already be divided by the temperature. Ties at a threshold are all kept.
    Top-k and top-p thresholds are found by bisection over the float order, not by sorting: XLA's
    sort of a 50k vocabulary costs ~30 ms per row on a CPU core, more than the model's decode
    step, while 32 masked reductions over the logits cost ~1 ms.
    """
    B, V = x_BxV.shape
    if flags.top_k or flags.top_p:
        keys_BxV = _ordered_keys(x_BxV)
        zero_B = jnp.zeros((B,), jnp.uint32)
        top_B = jnp.max(keys_BxV, axis=-1)
    if flags.top_k:
        # The k-th largest value: the largest t with #{x >= t} >= k.
        k_B = params.top_k_B
        kth_B = _bisect(lambda t: (keys_BxV >= t[:, None]).sum(-1) >= k_B, zero_B, top_B, largest=True)
        kept_BxV = (keys_BxV >= kth_B[:, None]) | (k_B[:, None] <= 0)
        x_BxV = jnp.where(kept_BxV, x_BxV, _NEG_INF)
        keys_BxV = jnp.where(kept_BxV, keys_BxV, _ordered_keys(jnp.float32(_NEG_INF)))
    if flags.top_p:
        # Nucleus: the largest values whose mass reaches p; a token is in it when the mass of
        # the tokens strictly above it is < p (so the top token always is). Its edge is the
        # smallest value t with mass(x > t) < p: that mass only falls as t rises, and it is
        # constant between consecutive logits, so the smallest such t is itself a logit.
        probs_BxV = jax.nn.softmax(x_BxV, axis=-1)
        p_B = params.top_p_B
        edge_B = _bisect(lambda t: jnp.where(keys_BxV > t[:, None], probs_BxV, 0.0).sum(-1) < p_B,
                         zero_B, top_B, largest=False)
        kept_BxV = (keys_BxV >= edge_B[:, None]) | (p_B[:, None] >= 1.0)
        x_BxV = jnp.where(kept_BxV, x_BxV, _NEG_INF)
    if flags.min_p:
        # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p): no softmax needed, and the
        # test is exact in the logit domain (min_p = 0 gives log 0 = -inf: keep everything).
        x_max_B = jnp.max(x_BxV, axis=-1)
        floor_B = x_max_B + jnp.log(params.min_p_B)
        x_BxV = jnp.where(x_BxV >= floor_B[:, None], x_BxV, _NEG_INF)
    return x_BxV


def first_argmax(x, axis=-1):
    """The first index of the maximum along `axis`, int32 (jnp.argmax's answer on finite input).

    Written as two float max-reductions, which XLA:CPU vectorises, where argmax's (value, index)
    pair reduction runs element by element: 1.3-2x faster over a 50k vocabulary. NaN input
    gives the last index instead of the NaN's.
    """
    x = x.astype(jnp.float32)
    n = x.shape[axis]
    shape = [1] * x.ndim
    shape[axis] = n
    # n - i for index i, so the largest marks the first maximum (exact in float32 below 2**24).
    rev = (n - jnp.arange(n, dtype=jnp.int32)).astype(jnp.float32).reshape(shape)
    best = jnp.max(jnp.where(x == jnp.max(x, axis=axis, keepdims=True), rev, 0.0), axis=axis)
    return jnp.minimum(n - best.astype(jnp.int32), n - 1)


def sample(logits_BxV, params: SamplingParams, flags: SamplingFlags, key, row_id_B, step_B,
           presence_BxV=None, greedy_B=None):
    """One token per row (int32, (B,)). Greedy rows (temperature 0) take the argmax.

    key: one PRNG key for the whole generation; row_id_B, step_B: see the module docstring.
    presence_BxV: required when flags.repetition_penalty.
    greedy_B: the argmax of logits_BxV, when the caller has it already (decode takes it from
      its head matmul's own layout); unused with the repetition penalty, which moves it.
    """
    x_BxV = logits_BxV.astype(jnp.float32)
    if flags.repetition_penalty:
        x_BxV = apply_repetition_penalty(x_BxV, presence_BxV, params.repetition_penalty_B)
    if greedy_B is None or flags.repetition_penalty:
        greedy_B = first_argmax(x_BxV, axis=-1)
    if not flags.sample:
        return greedy_B
    t_B = params.temperature_B
    safe_t_B = jnp.where(t_B > 0, t_B, 1.0)
    x_BxV = filter_logits(x_BxV / safe_t_B[:, None], params, flags)
    sampled_B = jax.vmap(functools.partial(_draw, key))(row_id_B, step_B, x_BxV)
    return jnp.where(t_B > 0, sampled_B, greedy_B)


# --- speculative decoding (jaxgpt/generation/speculative.py): the distribution `sample` draws from
def filtered_probs(logits_BxV, params: SamplingParams, flags: SamplingFlags, presence_BxV=None):
    """Each row's next-token distribution exactly as `sample` draws it, as (B, V) float32
    probabilities: softmax of the penalised, tempered, filtered logits (dropped tokens 0); for
    greedy rows (temperature 0, or flags.sample False) a one-hot of `sample`'s argmax.
    presence_BxV: required when flags.repetition_penalty. Speculative decoding's p and q."""
    x_BxV = logits_BxV.astype(jnp.float32)
    if flags.repetition_penalty:
        x_BxV = apply_repetition_penalty(x_BxV, presence_BxV, params.repetition_penalty_B)
    greedy_BxV = jax.nn.one_hot(first_argmax(x_BxV, axis=-1), x_BxV.shape[-1], dtype=jnp.float32)
    if not flags.sample:
        return greedy_BxV
    t_B = params.temperature_B
    safe_t_B = jnp.where(t_B > 0, t_B, 1.0)
    probs_BxV = jax.nn.softmax(filter_logits(x_BxV / safe_t_B[:, None], params, flags), axis=-1)
    return jnp.where(t_B[:, None] > 0, probs_BxV, greedy_BxV)
# --- end speculative decoding


_DRAW_BLOCK = 256


def _draw(key, row_id, step, x_V):
    """One token from softmax(x_V) by inverting the CDF with a single uniform draw.

    Gumbel-max (`jax.random.categorical`) needs V random numbers per row per step; at a 50k
    vocabulary generating them costs more than the rest of the sampling. Inverse-CDF needs
    one. It runs in two levels, so no prefix sum runs over the whole vocabulary: the masses of
    blocks of 256 tokens, the block where the cumulative mass reaches u * total, then the token
    inside that block. With u in (0, 1], the first index whose cumulative mass reaches the target
    has nonzero mass (the cumulative sum strictly grows there), so a dropped (-inf) token can
    never be drawn.
    """
    V = x_V.shape[-1]
    n_blocks = -(-V // _DRAW_BLOCK)
    u = 1.0 - jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, row_id), step))
    x_V = jnp.pad(x_V, (0, n_blocks * _DRAW_BLOCK - V), constant_values=_NEG_INF)
    w_NxK = jnp.exp(x_V - jnp.max(x_V)).reshape(n_blocks, _DRAW_BLOCK)
    cdf_N = jnp.cumsum(w_NxK.sum(-1))
    target = u * cdf_N[-1]
    blk = jnp.minimum(jnp.sum(cdf_N < target), n_blocks - 1)
    before = jnp.where(blk > 0, cdf_N[jnp.maximum(blk - 1, 0)], 0.0)  # < target by choice of blk
    w_K = w_NxK[blk]
    idx = jnp.sum(before + jnp.cumsum(w_K) < target)
    # Rounding can leave the block's own running sum a hair short of target: take its last
    # token with nonzero mass then.
    last_nonzero = jnp.max(jnp.where(w_K > 0, jnp.arange(_DRAW_BLOCK), 0))
    return (blk * _DRAW_BLOCK + jnp.minimum(idx, last_nonzero)).astype(jnp.int32)
