"""Beam search speed: jaxgpt's batched beam search vs transformers' generate(num_beams=K).

    PYTHONPATH=. python scripts/bench_beam.py [--model small 124m] [--batch 1 8] [--beams 4]

Both run on the same random weights (GPT-2 architecture; `bench_generate.hf_model` copies ours
into transformers' GPT2LMHeadModel), the same prompts (64 tokens), 64 new tokens, no EOS, float32,
do_sample=False, num_beams=K, length_penalty=1. The two alternate, best of --repeats each, and
the first call of ours (its compilation) is reported apart. Prints one JSON line per (model, B):
tokens/s counted as B x new tokens (the returned best beam per prompt), speed-up, and how many
prompts got the identical best beam (random weights make near-ties likely; a tie broken the other
way by float rounding changes the rest of a beam).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

import jaxgpt  # noqa: F401  (first: process-wide CPU settings before jax starts)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_generate import MODELS, hf_model  # noqa: E402


def ours(model, prompts, n_new, K):
    from jaxgpt.generation import generate
    t = time.perf_counter()
    out = generate(model, prompts, n_new, num_beams=K)
    return out, time.perf_counter() - t


def theirs(hf, prompts, n_new, K):
    import torch
    ids = torch.tensor(prompts, dtype=torch.long)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, num_beams=K, use_cache=True,
              max_new_tokens=n_new, min_new_tokens=n_new, length_penalty=1.0, early_stopping=False)
    with torch.inference_mode():
        t = time.perf_counter()
        out = hf.generate(ids, **kw)
        total = time.perf_counter() - t
    return out[:, ids.shape[1]:].tolist(), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["small", "124m"], choices=list(MODELS))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from jaxgpt.config import ModelConfig
    from jaxgpt.model import create_model

    rng = np.random.RandomState(0)
    for name in args.model:
        cfg = ModelConfig(**MODELS[name])
        model = create_model(cfg, seed=0)
        hf = hf_model(model)
        for B in args.batch:
            prompts = rng.randint(0, cfg.vocab_size, (B, args.prompt_len)).tolist()
            _, cold = ours(model, prompts, args.new_tokens, args.beams)
            theirs(hf, prompts, 2, args.beams)  # warm-up
            runs_ours, runs_hf = [], []
            for _ in range(args.repeats):
                runs_ours.append(ours(model, prompts, args.new_tokens, args.beams))
                runs_hf.append(theirs(hf, prompts, args.new_tokens, args.beams))
            (o_out, o_t), (h_out, h_t) = min(runs_ours, key=lambda r: r[1]), min(runs_hf, key=lambda r: r[1])
            n_tok = B * args.new_tokens
            print(json.dumps({
                "bench": "beam", "model": name, "batch": B, "num_beams": args.beams,
                "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                "ours_tokens_per_s": round(n_tok / o_t, 1), "ours_first_call_s": round(cold, 2),
                "hf_tokens_per_s": round(n_tok / h_t, 1), "speedup": round(h_t / o_t, 2),
                "identical_best_beams": sum(a == b for a, b in zip(o_out, h_out))}), flush=True)


if __name__ == "__main__":
    main()
