"""Speculative decoding on this CPU: trained target + draft models, against the target's plain decode.

    PYTHONPATH=. python scripts/bench_speculative.py                 # train once (cached), then measure
    PYTHONPATH=. python scripts/bench_speculative.py --train-only    # only the (cached) training
    PYTHONPATH=. python scripts/bench_speculative.py --corpus /path/to/tinyshakespeare.txt
    PYTHONPATH=. python scripts/bench_speculative.py --quick         # smoke run: tiny models, seconds

The recipe (models trained once by this script with `jaxgpt train`, cached under --out, default
out/spec_bench/<corpus>/; a finished model is never retrained, an interrupted one resumes):
  corpus   the Python standard library (`jaxgpt prepare --input stdlib`, byte tokenizer), or the
           text file given by --corpus (e.g. byte-level Tiny Shakespeare); nothing is read from
           outside the repository unless --corpus names it.
  t12x768  the target: GPT-2 small's body, 12 layers x 12 heads x 768 (85.1M params), block 256,
           batch 4 x 256 tokens, 220 steps, lr 8e-4 -> 8e-5 (cosine), warmup 25.
  t6x384   the second target: 6 x 6 x 384 (10.7M), block 256, batch 4 x 256, 500 steps, lr 1e-3.
  d4x128   the draft of both: the default stdlib recipe's shape, 4 x 4 x 128 (0.83M: 1/102 of the
           12-layer target, 1/13 of the 6-layer one), block 256, batch 8 x 256, 1500 steps, lr 2e-3.
Every model: no bias, no dropout, float32, seed 1337, the project's AdamW (see `jaxgpt train`).

Measured (see the fields below) for each target, at B = 1 and 8 rows, greedy and temperature 0.8:
the target's plain `jaxgpt.generate` and `jaxgpt.generate(..., draft=d4x128, num_draft=k)`,
interleaved run by run (the machine's speed swings), best of --repeats for each.
One JSON line per (target, batch, temperature, k):
  plain_tok_s / spec_tok_s: new tokens of all rows per second (prefill included; compile excluded);
  speedup: spec_tok_s / plain_tok_s; accept_rate: accepted draft tokens / proposed;
  tokens_per_round: tokens a row gains per target pass (accepted + 1);
  same_as_plain: greedy rows are token-for-token the plain output (greedy only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

DRAFT = "d4x128"
MODELS = {
    # name: (train overrides)
    "t12x768": {"model.n_layer": 12, "model.n_head": 12, "model.n_embd": 768, "batch_size": 4,
                "max_steps": 220, "lr": 8e-4, "min_lr": 8e-5, "warmup_steps": 25},
    "t6x384": {"model.n_layer": 6, "model.n_head": 6, "model.n_embd": 384, "batch_size": 4,
               "max_steps": 500, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 50},
    DRAFT: {"model.n_layer": 4, "model.n_head": 4, "model.n_embd": 128, "batch_size": 8,
            "max_steps": 1500, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 100},
}
COMMON = {"model.block_size": 256, "model.bias": False, "model.dropout": 0.0, "dtype": "float32",
          "eval_interval": 100000, "eval_steps": 20, "save_interval": 100, "log_interval": 20,
          "keep": 1, "seed": 1337}
QUICK = {  # --quick: tiny shapes, a few steps (a smoke run of the whole script)
    "t12x768": {"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 64, "batch_size": 4,
                "max_steps": 30, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 5},
    "t6x384": {"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 48, "batch_size": 4,
               "max_steps": 30, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 5},
    DRAFT: {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "batch_size": 4,
            "max_steps": 30, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 5},
}


def _jaxgpt(args: list[str]) -> None:
    """Run a `jaxgpt` subcommand in a fresh process (training frees its memory when it ends)."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-m", "jaxgpt", *args], check=True, env=env)


def ensure_models(out: str, corpus: str | None, quick: bool) -> dict:
    """Prepare the corpus and train every model not trained yet: {name: checkpoint dir}."""
    data = os.path.join(out, "data")
    if not os.path.isfile(os.path.join(data, "meta.json")):
        _jaxgpt(["prepare", "--input", corpus or "stdlib", "--out", data, "--tokenizer", "byte"])
    dirs, timings = {}, {}
    for name, over in (QUICK if quick else MODELS).items():
        run = os.path.abspath(os.path.join(out, name))
        dirs[name] = run
        steps = over["max_steps"]
        if os.path.isdir(os.path.join(run, str(steps), "params")):
            continue
        kv = {**COMMON, **over, "data": data, "out": run}
        if quick:
            kv.update(eval_steps=2, save_interval=1000)
        t = time.perf_counter()
        _jaxgpt(["train"] + [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in kv.items()])
        timings[name] = round(time.perf_counter() - t, 1)
        print(json.dumps({"trained": name, "steps": steps, "wall_s": timings[name],
                          "load_avg": os.getloadavg()[0]}), flush=True)
    return dirs


def val_prompts(data_dir: str, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """n prompts of `length` tokens from the validation split, each starting at a line start."""
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    val = np.memmap(os.path.join(data_dir, "val.bin"), dtype=meta["dtype"], mode="r")
    rng = np.random.default_rng(seed)
    newline = int(np.frombuffer(b"\n", np.uint8)[0])
    out = []
    while len(out) < n:
        i = int(rng.integers(0, len(val) - length - 1))
        while i < len(val) - length - 1 and int(val[i]) != newline:
            i += 1
        out.append([int(t) for t in val[i + 1:i + 1 + length]])
    return out


def measure(target, draft, prompts, n_new, temperature, ks, repeats):
    """Plain and speculative generate, interleaved call by call; best time of `repeats` each."""
    import jaxgpt

    kw = dict(temperature=temperature, seed=0)
    calls = {"plain": lambda: (jaxgpt.generate(target, prompts, n_new, **kw), None)}
    for k in ks:
        calls[k] = lambda k=k: jaxgpt.generate(target, prompts, n_new, draft=draft, num_draft=k,
                                               return_stats=True, **kw)
    results, times, compile_s = {}, {name: [] for name in calls}, {}
    for name, call in calls.items():  # first call: compilation
        t = time.perf_counter()
        results[name] = call()
        compile_s[name] = time.perf_counter() - t
    for _ in range(repeats):
        for name, call in calls.items():
            t = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t)
    best = {name: min(ts) for name, ts in times.items()}
    n_tok = sum(len(r) for r in results["plain"][0])
    plain_tok_s = n_tok / best["plain"]
    rows = []
    for k in ks:
        out, stats = results[k]
        spec_tok_s = sum(len(r) for r in out) / best[k]
        row = {"k": k, "plain_tok_s": round(plain_tok_s, 1), "spec_tok_s": round(spec_tok_s, 1),
               "speedup": round(spec_tok_s / plain_tok_s, 2), "accept_rate": round(stats.acceptance_rate, 3),
               "tokens_per_round": round(stats.tokens_per_round, 2),
               "plain_ms_per_step": round(1e3 * best["plain"] / n_new, 2),
               "spec_ms_per_round": round(1e3 * best[k] / max(1, max(stats.rounds)), 2),
               "compile_s": round(max(compile_s[k] - best[k], 0), 1)}
        if temperature == 0:
            row["same_as_plain"] = out == results["plain"][0]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=None, help="a text file to train on (default: the stdlib)")
    ap.add_argument("--out", default=None, help="model cache (default out/spec_bench/<corpus>)")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny models, few tokens: a smoke run")
    ap.add_argument("--targets", nargs="+", default=["t12x768", "t6x384"], choices=[m for m in MODELS if m != DRAFT])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--temperature", nargs="+", type=float, default=[0.0, 0.8])
    ap.add_argument("--num-draft", nargs="+", type=int, default=[4], help="k values to measure")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=192, help="prompt + new <= 256 (no window)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    name = "stdlib" if args.corpus is None else os.path.splitext(os.path.basename(args.corpus))[0]
    out = args.out or os.path.join("out", "spec_bench_quick" if args.quick else "spec_bench", name)
    dirs = ensure_models(out, args.corpus, args.quick)
    if args.train_only:
        return
    if args.quick:
        args.prompt_len, args.new_tokens, args.repeats = 16, 32, 1

    import jax
    from flax import nnx

    from jaxgpt.checkpoint import load_model

    def n_params(model):
        return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

    draft, _, dmeta = load_model(dirs[DRAFT])
    prompts_all = val_prompts(os.path.join(out, "data"), max(args.batch), args.prompt_len)
    for tname in args.targets:
        target, _, tmeta = load_model(dirs[tname])
        head = {"target": tname, "draft": DRAFT, "corpus": name,
                "target_val_loss": round(tmeta.get("metrics", {}).get("val_loss", float("nan")), 4),
                "draft_val_loss": round(dmeta.get("metrics", {}).get("val_loss", float("nan")), 4),
                "param_ratio": round(n_params(draft) / n_params(target), 4)}
        for B in args.batch:
            for temp in args.temperature:
                rows = measure(target, draft, prompts_all[:B], args.new_tokens, temp, args.num_draft,
                               args.repeats)
                for row in rows:
                    print(json.dumps({**head, "batch": B, "temperature": temp, **row,
                                      "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                                      "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
    main()
