"""A torch-free oracle for beam search: Hugging Face transformers' semantics in plain numpy.

`beam_search_reference` follows transformers' `GenerationMixin._beam_search` (5.23/5.24, the
vectorised implementation) for ONE prompt, decoder-only, do_sample=False, no logits processor,
step by step: docs/beam_search_semantics.md describes each rule and where transformers has it.
It needs only a function giving next-token log-probabilities, so tests can run it on any model
(a tiny random jaxgpt model, or the golden GPT-2 of tests/data/golden) and compare jaxgpt's beam
search with it; scripts/make_golden.py checks it against transformers on every golden case.

Arithmetic is float64 (transformers accumulates in float32): both agree wherever no decision is
a near-tie, which is what the `trace` margins measure and what the golden cases guarantee.
Exact ties are broken by the lower flat index (beam * V + token) first, then by age in the
finished list (torch.topk leaves ties unspecified; never build a test on one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

NEG = -1.0e9  # transformers' "very large negative" constant, used as an additive mask


def _eos_set(eos_id) -> frozenset[int]:
    if eos_id is None:
        return frozenset()
    if isinstance(eos_id, Iterable):
        return frozenset(int(e) for e in eos_id)
    return frozenset([int(eos_id)])


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first; ties -> lower index first."""
    if k < scores.size:  # only the entries reaching the k-th largest value need sorting
        kth = np.partition(scores, scores.size - k)[scores.size - k]
        pool = np.flatnonzero(scores >= kth)
    else:
        pool = np.arange(scores.size)
    return pool[np.lexsort((pool, -scores[pool]))][:k]


def _in_sum_units(gap: float, len_a: int, len_b: int, length_penalty: float) -> float:
    """A gap between two length-normalised scores, expressed in summed-log-probability units.

    score = sum / L**lp, so an error e in a sum moves the score by e / L**lp: the gap divided by
    the mean of the two scale factors is the error in the sums that would close it."""
    return abs(gap) / (0.5 * (len_a ** -length_penalty + len_b ** -length_penalty))


def beam_search_reference(
    logprob_fn: Callable[[list[list[int]]], np.ndarray],
    prompt: Sequence[int],
    num_beams: int,
    max_new_tokens: int,
    eos_id=None,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    *,
    trace: dict | None = None,
) -> tuple[list[list[int]], np.ndarray]:
    """Beam search over `prompt` as transformers' generate(num_beams=..., do_sample=False).

    logprob_fn(seqs) -> (len(seqs), V) next-token log-probabilities (log_softmax over the whole
      real vocabulary) after each full token list `seqs[i]` (the prompt plus its beam's tokens;
      all lists of one call have the same length).
    eos_id: None (stop only at max_new_tokens), an int, or several ints.
    early_stopping: False, True or "never" (transformers' three modes).

    Returns (sequences, scores): the `num_return_sequences` best finished hypotheses, best
    first; sequences hold the NEW tokens only, unpadded (a hypothesis that ended with EOS
    includes it and may be shorter than max_new_tokens); scores are transformers'
    `sequences_scores`: the hypothesis' summed log-probabilities divided by
    (number of new tokens, EOS included) ** length_penalty.

    trace: pass a dict to receive "steps" (decoding steps run), "admitted" (every hypothesis
    that entered the finished list: (new tokens, score)) and "margins" (a list of
    (kind, step, gap) for every decision a small perturbation of the log-probabilities could
    flip; gaps are in summed-log-probability units, see `_in_sum_units`).
    """
    K, P = int(num_beams), len(prompt)
    if K < 1 or max_new_tokens < 1 or P < 1:
        raise ValueError("need num_beams >= 1, max_new_tokens >= 1 and a non-empty prompt")
    if not 1 <= num_return_sequences <= K:
        raise ValueError("num_return_sequences must be in [1, num_beams]")
    if early_stopping not in (True, False, "never"):
        raise ValueError("early_stopping must be True, False or 'never'")
    lp_pow = float(length_penalty)
    eos = _eos_set(eos_id)
    keep = max(2, 1 + len(eos)) * K  # candidates kept per step
    max_length = P + max_new_tokens
    margins: list[tuple[str, int, float]] = []
    admitted: list[tuple[list[int], float]] = []

    # running beams: K copies of the prompt; all but the first start at -1e9 so that the first
    # step expands the prompt once instead of K times
    running = [list(prompt) for _ in range(K)]
    run_scores = np.full(K, NEG)
    run_scores[0] = 0.0
    # finished list: K slots (sorted best first), initially placeholders scored -1e9
    fin_seqs = [list(prompt) for _ in range(K)]
    fin_scores = np.full(K, NEG)
    fin_done = np.zeros(K, bool)
    fin_len = np.ones(K, int)  # new-token counts of the slots (for margins only)
    may_improve = True  # transformers' is_early_stop_heuristic_unsatisfied

    step = 0
    cur_len = P
    while True:
        logp = np.asarray(logprob_fn(running), np.float64)
        if logp.ndim != 2 or logp.shape[0] != K:
            raise ValueError(f"logprob_fn returned shape {logp.shape}, expected ({K}, V)")
        V = logp.shape[1]
        total = (logp + run_scores[:, None]).reshape(-1)  # (K*V,) accumulated scores

        idx = _top(total, keep)
        c_score = total[idx]
        c_beam, c_tok = idx // V, idx % V
        c_seq = [running[b] + [int(t)] for b, t in zip(c_beam, c_tok)]
        last_step = cur_len + 1 >= max_length
        c_hit = np.array([last_step or int(t) in eos for t in c_tok])

        # -- margins of the two selections made from the candidates
        if trace is not None:
            ranked = total[_top(total, keep + 1)]
            if last_step:
                if ranked.size > K:
                    margins.append(("admit", step, ranked[K - 1] - ranked[K]))
            elif eos and may_improve and ranked.size > K:
                # each EOS candidate must be robustly inside or outside the top K
                for b in range(K):
                    for e in eos:
                        s = total[b * V + e]
                        if s <= NEG / 2 or e >= V:
                            continue
                        rank = int(np.sum(total > s))
                        margins.append(("admit", step, s - ranked[K] if rank < K else ranked[K - 1] - s))
            if not last_step:
                # the K continuing beams are the K best non-EOS candidates over all K*V
                masked = total.copy()
                for e in eos:
                    if e < V:
                        masked[e::V] = -np.inf
                nh = masked[_top(masked, K + 1)]
                if nh.size > K and nh[K] > NEG / 2:
                    margins.append(("continue", step, nh[K - 1] - nh[K]))

        # -- the K continuing beams: best candidates that did not finish
        order = _top(c_score + NEG * c_hit, K)
        running = [c_seq[i] for i in order]
        run_scores = (c_score + NEG * c_hit)[order]

        # -- finished hypotheses: candidates ranked < K that finished (EOS, or max length)
        n_new = cur_len + 1 - P
        norm = c_score / (n_new ** lp_pow)
        just_done = c_hit & (np.arange(keep) < K)
        blocked = (early_stopping is True and fin_done.all()) or not may_improve
        cand_scores = norm + NEG * blocked + NEG * (~just_done)
        for i in np.flatnonzero(just_done & (not blocked)):
            admitted.append((c_seq[i][P:], float(norm[i])))
        m_scores = np.concatenate([fin_scores, cand_scores])
        m_seqs = fin_seqs + c_seq
        m_done = np.concatenate([fin_done, just_done])  # as transformers (blocked ones lose anyway)
        m_len = np.concatenate([fin_len, np.full(keep, n_new)])
        sel = _top(m_scores, K)
        fin_scores, fin_done, fin_len = m_scores[sel], m_done[sel], m_len[sel]
        fin_seqs = [m_seqs[i] for i in sel]

        # -- can the search still improve the finished list?
        cur_len += 1
        step += 1
        if early_stopping == "never" and lp_pow > 0.0:
            hyp_len = max_length - P  # a positive penalty favours the longest possible beam
        else:
            hyp_len = cur_len - P  # the best running beam, as if it ended now
        best_possible = run_scores[0] / (hyp_len ** lp_pow)
        worst = np.where(fin_done, fin_scores.min(), NEG)
        if (trace is not None and fin_done.all() and may_improve and not c_hit.all()
                and early_stopping is not True):  # True stops on a full list regardless
            w = int(np.argmin(fin_scores))
            margins.append(("stop", step, _in_sum_units(best_possible - fin_scores[w], hyp_len,
                                                        int(fin_len[w]), lp_pow)))
        may_improve = may_improve and bool(np.any(best_possible > worst))
        open_beam = not (fin_done.all() and early_stopping is True)
        if not (may_improve and open_beam and not c_hit.all()):
            break

    n_ret = num_return_sequences
    if trace is not None:
        # the final list is the best K of everything admitted: its order and membership
        ranked = sorted(admitted, key=lambda a: -a[1])[:K + 1]
        for a, b in zip(ranked, ranked[1:]):
            margins.append(("final", step, _in_sum_units(a[1] - b[1], len(a[0]), len(b[0]), lp_pow)))
        trace.update(steps=step, admitted=admitted, margins=margins)
    return [s[P:] for s in fin_seqs[:n_ret]], fin_scores[:n_ret].copy()


def min_margin(trace: dict) -> float:
    """The smallest decision gap recorded in a trace (inf when no decision was close to any)."""
    return min((float(g) for _, _, g in trace["margins"]), default=float("inf"))
