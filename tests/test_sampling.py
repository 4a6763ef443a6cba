"""Sampling filters keep exactly the support a NumPy reference keeps; draws follow the distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from jaxgpt.generation.sampling import (SamplingFlags, SamplingParams, apply_repetition_penalty, filter_logits,
                             first_argmax, sample)

ALL = SamplingFlags(sample=True, top_k=True, top_p=True, min_p=True, repetition_penalty=True)
MARGIN = 1e-4  # examples this close to a top-p / min-p boundary are float-ambiguous: skipped
# (Subnormal logits are excluded: XLA:CPU flushes them to zero, NumPy does not.)


def _softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    e[~np.isfinite(x)] = 0.0
    return e / e.sum()


def ref_support(x, k, p, min_p):
    """NumPy reference: top-k, then top-p on the renormalised survivors, then min-p. Ties kept."""
    x = np.asarray(x, np.float64).copy()
    if k > 0:
        kth = np.sort(x)[::-1][min(k, x.size) - 1]
        x[x < kth] = -np.inf
    if p < 1:
        probs = _softmax64(x)
        order = np.argsort(-x, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        assume(np.all(np.abs(before - p) > MARGIN))
        n_keep = max(int((before < p).sum()), 1)
        edge = x[order][n_keep - 1]
        x[x < edge] = -np.inf
    if min_p > 0:
        probs = _softmax64(x)
        ratio = probs / probs.max()
        assume(np.all(np.abs(ratio[np.isfinite(x)] - min_p) > MARGIN))
        x[ratio < min_p] = -np.inf
    return np.isfinite(x)


MAX_B, MAX_V = 4, 40
_filter = jax.jit(filter_logits, static_argnums=2)


def filter_support(x, ks, ps, mps, flags):
    """Run the jitted filter on one padded (MAX_B, MAX_V) shape (one compile for all examples).

    Padding columns are -inf (already dropped, zero mass, never a k-th value for k <= V) and
    padding rows are zeros with neutral knobs, so the real entries' support is unchanged.
    """
    B, V = x.shape
    xp = np.zeros((MAX_B, MAX_V), np.float32)
    xp[:, V:] = -np.inf
    xp[:B, :V] = x
    pad = MAX_B - B
    params = SamplingParams.make(MAX_B, 1.0, list(ks) + [0] * pad, list(ps) + [1.0] * pad,
                                 list(mps) + [0.0] * pad, 1.0)
    return np.isfinite(np.asarray(_filter(jnp.asarray(xp), params, flags)))[:B, :V]


logit_rows = st.integers(2, MAX_V).flatmap(lambda v: st.lists(
    st.lists(st.floats(-8, 8, allow_nan=False, allow_subnormal=False, width=32), min_size=v, max_size=v), min_size=1, max_size=MAX_B))


@settings(max_examples=100, deadline=None)
@given(rows=logit_rows, data=st.data())
def test_filters_keep_reference_support(rows, data):
    x = np.asarray(rows, np.float32)
    B, V = x.shape
    # Each row gets its own knobs, neutral values included: one program, mixed settings.
    ks = data.draw(st.lists(st.integers(0, V), min_size=B, max_size=B))
    ps = data.draw(st.lists(st.one_of(st.just(1.0), st.floats(0.01, 1.0)), min_size=B, max_size=B))
    mps = data.draw(st.lists(st.one_of(st.just(0.0), st.floats(0.0, 1.0)), min_size=B, max_size=B))
    got = filter_support(x, ks, ps, mps, ALL)
    want = np.stack([ref_support(x[b], ks[b], ps[b], mps[b]) for b in range(B)])
    np.testing.assert_array_equal(got, want)


@settings(max_examples=60, deadline=None)
@given(rows=logit_rows, data=st.data())
def test_each_filter_alone_matches_reference(rows, data):
    # A program compiled with one filter must not apply the others.
    x = np.asarray(rows, np.float32)
    B, V = x.shape
    k = data.draw(st.integers(1, V))
    p = data.draw(st.floats(0.01, 0.99))
    m = data.draw(st.floats(0.01, 1.0))
    for flags, ref in ((SamplingFlags(top_k=True), lambda r: ref_support(r, k, 1.0, 0.0)),
                       (SamplingFlags(top_p=True), lambda r: ref_support(r, 0, p, 0.0)),
                       (SamplingFlags(min_p=True), lambda r: ref_support(r, 0, 1.0, m))):
        got = filter_support(x, [k] * B, [p] * B, [m] * B, flags)
        np.testing.assert_array_equal(got, np.stack([ref(r) for r in x]))


@settings(max_examples=100, deadline=None)
@given(rows=logit_rows, data=st.data())
def test_repetition_penalty_matches_reference(rows, data):
    x = np.asarray(rows, np.float32)
    B, V = x.shape
    seen = np.asarray(data.draw(st.lists(st.lists(st.booleans(), min_size=V, max_size=V),
                                         min_size=B, max_size=B)))
    r = np.asarray(data.draw(st.lists(st.floats(0.1, 5.0), min_size=B, max_size=B)), np.float32)
    want = np.where(seen, np.where(x > 0, x / r[:, None], x * r[:, None]), x)
    got = apply_repetition_penalty(jnp.asarray(x), jnp.asarray(seen), jnp.asarray(r))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-37)  # XLA flushes subnormals


def _draws(logits_V, n, **knobs):
    """n draws of one row, one per step (each step folds a fresh key)."""
    x = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (n, len(logits_V)))
    params = SamplingParams.make(n, **knobs)
    flags = SamplingFlags(sample=True, top_k="top_k" in knobs, top_p="top_p" in knobs)
    f = jax.jit(lambda x, p: sample(x, p, flags, jax.random.key(0), jnp.zeros(n, jnp.int32),
                                    jnp.arange(n)))
    return np.asarray(f(x, params))


def test_draws_follow_the_distribution():
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    n = 20000
    freq = np.bincount(_draws(np.log(probs), n), minlength=4) / n
    # 4.5 binomial standard deviations: a wrong sampler (e.g. an off-by-one in the CDF search,
    # which shifts 0.1 of mass) fails by far more.
    np.testing.assert_allclose(freq, probs, atol=4.5 * np.sqrt(0.25 / n))


def test_temperature_sharpens_and_filters_are_respected():
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    cold = np.bincount(_draws(logits, 4000, temperature=0.25), minlength=4) / 4000
    assert cold[3] > 0.6 and cold[0] < 0.02  # p ~ x^4: [0.003, 0.047, 0.24, 0.71]
    assert set(_draws(logits, 2000, top_k=2).tolist()) == {2, 3}
    assert set(_draws(logits, 2000, top_p=0.5).tolist()) == {2, 3}  # 0.4 < 0.5 <= 0.7


def test_dropped_tokens_are_never_drawn_even_with_tiny_mass():
    logits = np.array([0.0, -np.inf, 0.0, -np.inf, -30.0], np.float32)
    assert not ({1, 3} & set(_draws(logits, 5000).tolist()))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 300), st.data())
def test_first_argmax_equals_numpy_argmax_with_ties(rows, n, data):
    """Including ties (values drawn from a few levels) and -inf, along either axis."""
    levels = st.sampled_from([-np.inf, -3.0, 0.0, 0.5, 2.0, 7.25])
    x = np.array(data.draw(st.lists(st.lists(levels, min_size=n, max_size=n), min_size=rows, max_size=rows)),
                 np.float32)
    # Padded with -inf to one shape (one compile): trailing -inf never moves the first maximum.
    xp = np.full((5, 300), -np.inf, np.float32)
    xp[:rows, :n] = x
    np.testing.assert_array_equal(np.asarray(_argmax_last(xp))[:rows], np.argmax(x, -1))
    np.testing.assert_array_equal(np.asarray(_argmax_first(xp.T))[:rows], np.argmax(x, -1))


_argmax_last = jax.jit(lambda x: first_argmax(x, axis=-1))
_argmax_first = jax.jit(lambda x: first_argmax(x, axis=0))


def test_signed_zeros_tie():
    """-0.0 == 0.0: a top-k or top-p threshold at 0 keeps both (found by the property test)."""
    x = np.zeros((1, 33), np.float32)
    x[0, -1] = -0.0
    assert filter_support(x, [1], [1.0], [0.0], ALL).all()
    assert filter_support(x, [0], [0.5], [0.0], ALL).all()


def test_greedy_rows_take_the_argmax_and_ignore_randomness():
    x = jnp.asarray(np.random.RandomState(0).randn(3, 50), jnp.float32)
    params = SamplingParams.make(3, [0.0, 0.0, 0.0], top_k=[5, 0, 1], top_p=[0.3, 1.0, 1.0])
    for seed in (0, 1):
        got = sample(x, params, ALL,
                     jax.random.key(seed), jnp.arange(3), jnp.zeros(3, jnp.int32),
                     jnp.zeros((3, 50), bool))
        np.testing.assert_array_equal(np.asarray(got), np.argmax(np.asarray(x), -1))


@pytest.mark.slow  # per-row seeds are also checked by the generate tests
def test_row_draw_depends_on_row_id_and_step_not_on_batch():
    rng = np.random.RandomState(1)
    x = rng.randn(4, 200).astype(np.float32)
    flags = SamplingFlags(sample=True)
    key = jax.random.key(7)
    full = sample(jnp.asarray(x), SamplingParams.make(4), flags, key, jnp.arange(4), jnp.full(4, 3))
    # Row 2 alone, with its own row id and step, draws the same token.
    alone = sample(jnp.asarray(x[2:3]), SamplingParams.make(1), flags, key, jnp.array([2]),
                   jnp.array([3]))
    assert int(alone[0]) == int(full[2])
    # Identical rows with different ids (num-samples) or steps draw differently.
    same = np.repeat(x[:1], 64, 0)
    by_row = sample(jnp.asarray(same), SamplingParams.make(64), flags, key, jnp.arange(64),
                    jnp.zeros(64, jnp.int32))
    by_step = sample(jnp.asarray(same), SamplingParams.make(64), flags, key, jnp.zeros(64, jnp.int32),
                     jnp.arange(64))
    assert len(set(np.asarray(by_row).tolist())) > 10
    assert len(set(np.asarray(by_step).tolist())) > 10


@pytest.mark.parametrize("penalty", [1.0, 2.0])
def test_repetition_penalty_steers_greedy(penalty):
    x = jnp.asarray([[3.0, 2.0, -1.0]])
    seen = jnp.asarray([[True, False, False]])
    params = SamplingParams.make(1, 0.0, repetition_penalty=penalty)
    got = int(sample(x, params, SamplingFlags(sample=False, repetition_penalty=True), jax.random.key(0),
                     jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32), seen)[0])
    assert got == (0 if penalty == 1.0 else 1)  # 3/2 = 1.5 < 2
