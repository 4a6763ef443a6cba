"""jaxgpt `generate` vs transformers `generate` (PyTorch, CPU) on the same GPT-2 124M weights.

    PYTHONPATH=. python scripts/bench_gpt2_generate.py [--batch 1 8] [--prompt 64] [--new 128]

Weights: the real GPT-2 from the local Hugging Face cache when present, else transformers'
random init of `GPT2Config()` (the 124M shape; the speed does not depend on the values). The
same weights go through `jaxgpt.hf.load_hf`, so both engines run the same model.

Per batch size and mode (greedy; top-p 0.9 at temperature 1) prints one JSON line with each
engine's new tokens per second and jax/torch. Both engines generate exactly `--new` tokens per
row (no EOS stop, transformers' default top_k=50 switched off so top-p is the only filter).
jaxgpt is warmed up first with the same shapes, so its compile time is excluded; transformers
gets one untimed warm-up call too. Timings are the best of `--repeats` runs, the engines
alternating. For greedy runs, `greedy_rows_equal` says how many rows the two engines decoded
identically (a parity check at full scale: random weights have small logit gaps, so a late
divergence can be float noise).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings

import numpy as np


def _best_interleaved(fns, repeats):
    """Best wall time of each fn over `repeats` rounds, alternating engines within a round so a
    burst of load from other processes hits both rather than one."""
    best, outs = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    import jax
    import torch
    import transformers

    from jaxgpt import hf
    from jaxgpt.generation import generate

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.torch_threads)

    cached = hf.find_cached("gpt2")
    with tempfile.TemporaryDirectory() as tmp:
        if cached:
            src, weights = cached, "gpt2 (HF cache)"
        else:
            torch.manual_seed(0)
            transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(tmp)
            src, weights = tmp, "random GPT2Config() (124M shape)"
        ref = transformers.GPT2LMHeadModel.from_pretrained(src).eval()
        ours, _tok = hf.load_hf(src)
    V = ours.cfg.vocab_size

    rng = np.random.default_rng(0)
    for B in args.batch:
        prompts = rng.integers(0, V, (B, args.prompt))
        ids = torch.tensor(prompts)
        mask = torch.ones_like(ids)
        for mode in ("greedy", "top_p0.9"):
            greedy = mode == "greedy"
            jkw = dict(temperature=0.0) if greedy else dict(temperature=1.0, top_p=0.9)
            tkw = dict(do_sample=False) if greedy else dict(do_sample=True, top_p=0.9, top_k=0,
                                                            temperature=1.0)

            def run_jax(seed=0):
                return generate(ours, prompts.tolist(), args.new, eos_id=None, seed=seed, **jkw)

            def run_torch(n=args.new):
                with torch.no_grad():
                    return ref.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                        use_cache=True, pad_token_id=0, eos_token_id=None, **tkw)

            run_jax()  # compile (prefill + decode chunks) for these shapes
            run_torch(4)
            (tj, tt), (out_j, out_t) = _best_interleaved([run_jax, run_torch], args.repeats)
            assert all(len(r) == args.new for r in out_j) and out_t.shape == (B, args.prompt + args.new)
            line = {"bench": "gpt2_generate", "weights": weights, "B": B, "prompt": args.prompt,
                    "new": args.new, "mode": mode,
                    "jax_tok_s": round(B * args.new / tj, 1), "torch_tok_s": round(B * args.new / tt, 1),
                    "jax_over_torch": round(tt / tj, 3),
                    "jax_backend": jax.default_backend(), "jax_devices": jax.device_count(),
                    "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
            if greedy:
                line["greedy_rows_equal"] = f"{sum(a == b[args.prompt:].tolist() for a, b in zip(out_j, out_t))}/{B}"
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
