"""tests/beam_reference.py (the numpy beam-search oracle) reproduces transformers' beam search:
every case of tests/data/golden/vocab1000/beams.json, with jaxgpt's float32 forward of the
golden model as the log-probability function. No torch needed.

scripts/make_golden.py already checks the oracle against transformers with torch's own
log-probabilities (and on the "odd" model too); this test keeps that true without torch, and
pins the stored file's conventions (padding, lengths) that a jaxgpt beam search test relies on."""

import json
import os

import numpy as np
import pytest

from beam_reference import beam_search_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "data", "golden", "vocab1000")
WIDTH = 32  # every forward is (K, WIDTH): right padding is invisible to a causal model


def _cases():
    with open(os.path.join(GOLDEN, "beams.json")) as f:
        return json.load(f)["cases"]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def logprob_fn():
    """Next-token log-probabilities of the golden model through jaxgpt, memoised per row
    (the cases of one group share their prompt, so most rows repeat)."""
    from jaxgpt import hf
    from jaxgpt.generation import logits

    model, _ = hf.load_hf(GOLDEN)
    with open(os.path.join(GOLDEN, "config.json")) as f:
        V = json.load(f)["vocab_size"]  # jaxgpt pads the vocabulary: drop its extra columns
    memo: dict[tuple[int, ...], np.ndarray] = {}

    def fn(seqs):
        keys = [tuple(s) for s in seqs]
        if any(k not in memo for k in keys):
            n = len(seqs[0])
            assert n <= WIDTH and all(len(s) == n for s in seqs)
            toks = np.zeros((len(seqs), WIDTH), np.int32)
            toks[:, :n] = seqs
            rows = _log_softmax(np.asarray(logits(model, toks))[:, n - 1, :V])
            memo.update(zip(keys, rows))
        return np.stack([memo[k] for k in keys])
    return fn


def test_golden_file_conventions():
    cases = _cases()
    assert len(cases) >= 90
    seen = {(kw["num_beams"], kw["eos_token_id"] is None, str(kw["early_stopping"]), kw["length_penalty"])
            for kw in (c["kwargs"] for c in cases)}
    assert {k for k, *_ in seen} == {2, 3, 5}
    assert {(es, lp) for _, no_eos, es, lp in seen if not no_eos} == {
        (es, lp) for es in ("False", "True", "never") for lp in (0.5, 1.0, 2.0)}
    assert {len(c["prompt"]) for c in cases} >= {1, 4, 11}
    assert {c["kwargs"]["num_return_sequences"] for c in cases} == {1, 2, 3, 5}
    for c in cases:
        kw, seqs, lengths = c["kwargs"], c["sequences"], c["lengths"]
        assert len(seqs) == len(lengths) == len(c["sequences_scores"]) == kw["num_return_sequences"]
        assert c["sequences_scores"] == sorted(c["sequences_scores"], reverse=True)
        assert {len(s) for s in seqs} == {max(lengths)}  # padded to the longest returned
        for s, n in zip(seqs, lengths):
            assert s[n:] == [kw["pad_token_id"]] * (len(s) - n)
            if n < kw["max_new_tokens"]:  # only an EOS ends a hypothesis early, and it is kept
                assert s[n - 1] == kw["eos_token_id"] and kw["eos_token_id"] not in s[:n - 1]
    # EOS really shapes the references: early ends, early stops, modes that disagree
    assert sum(min(c["lengths"]) < c["kwargs"]["max_new_tokens"] for c in cases) >= 20
    assert sum(c["steps"] < c["kwargs"]["max_new_tokens"] for c in cases) >= 10


def test_reference_reproduces_transformers(logprob_fn):
    for c in _cases():
        kw, trace = c["kwargs"], {}
        seqs, scores = beam_search_reference(
            logprob_fn, c["prompt"], kw["num_beams"], kw["max_new_tokens"], kw["eos_token_id"],
            kw["length_penalty"], kw["early_stopping"], kw["num_return_sequences"], trace=trace)
        want = [s[:n] for s, n in zip(c["sequences"], c["lengths"])]
        assert seqs == want, (c["prompt"], kw)
        np.testing.assert_allclose(scores, c["sequences_scores"], rtol=0, atol=1e-4, err_msg=str(kw))
        assert trace["steps"] == c["steps"], (c["prompt"], kw)


def _toy_logprob_fn(V=7, seed=0):
    """A model whose next token depends only on the last one (a random Markov chain)."""
    table = _log_softmax(np.random.default_rng(seed).normal(0.0, 2.0, (V, V)))
    return lambda seqs: table[[s[-1] for s in seqs]]


@pytest.mark.parametrize("lp", [0.5, 1.0, 2.0])
def test_score_is_sum_over_new_tokens_to_the_length_penalty(lp):
    fn = _toy_logprob_fn()
    for es in (False, True, "never"):
        # the prompt's length does not enter the score: only the new tokens, EOS included
        short = beam_search_reference(fn, [3], 3, 6, 2, lp, es, 3)
        long = beam_search_reference(fn, [5, 1, 4, 3], 3, 6, 2, lp, es, 3)
        assert short[0] == long[0]
        np.testing.assert_allclose(short[1], long[1], rtol=0, atol=1e-12)
        for seq, score in zip(*short):
            toks = [3] + seq
            total = sum(fn([toks[:i + 1]])[0, toks[i + 1]] for i in range(len(seq)))
            assert score == pytest.approx(total / len(seq) ** lp, abs=1e-12)
