"""The training step's matrix products alone: XLA:CPU's two float32 GEMM paths vs torch (MKL).

    PYTHONPATH=. python scripts/bench_matmul.py [--config b c] [--reps N] [--rounds R]

Why this exists: matrix products are ~75% of a training step's FLOPs, so the step can only
beat torch (scripts/bench_train.py) if XLA's products keep up with torch's. This prints one
JSON line per product of the bench_train config: GFLOP/s for
- `xla_ynn`: jax as jaxgpt runs it (XLA:CPU's default: dots go to YNNPACK),
- `xla_eigen`: the same jitted product compiled with YNNPACK dot fusions off
  (`xla_cpu_experimental_ynn_fusion_type` empty: XLA's own dot thunk),
- `torch`: torch's `@` (MKL here), when torch is installed;
then one summary line per config: the products' total time in each engine, weighted by how
often one training step runs each.

Each figure is the median over rounds. Every round times each engine's block of --reps calls,
and it sleeps 50 ms before each block: an engine's worker threads spin for a while after
its last call (OpenMP, Eigen), which would otherwise slow the next engine's first calls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jaxgpt  # noqa: F401  (first: the package's CPU settings apply before jax starts)
from bench_train import CONFIGS, _timed  # this script's folder is on sys.path when it is run


def products(spec: dict) -> list[dict]:
    """The (M, K, N) products of one training step of `spec` and how many it runs of each.

    "tn" products contract the token axis of two activations (weight gradients): A (K, M) is
    stored token-major, so the product is A^T B, as the backward pass computes it.
    """
    N = spec["batch_size"] * spec["block_size"]
    D, L, V = spec["n_embd"], spec["n_layer"], spec["vocab_size"]
    F = 4 * D
    rows = [
        # forward and input-gradient products of a block (a gradient w.r.t. the input of
        # x @ W (in, out) is dy @ W^T: the same shape as the forward of the transposed layer)
        ("qkv", "nn", N, D, 3 * D, L), ("qkv dx", "nn", N, 3 * D, D, L),
        ("attn out", "nn", N, D, D, 2 * L),
        ("fc / mlp out dx", "nn", N, D, F, 2 * L), ("fc dx / mlp out", "nn", N, F, D, 2 * L),
        # weight gradients: activations^T @ output gradients, over all N tokens
        ("qkv dW", "tn", D, N, 3 * D, L), ("attn out dW", "tn", D, N, D, L),
        ("fc dW", "tn", D, N, F, L), ("mlp out dW", "tn", F, N, D, L),
    ]
    if V >= 1024:  # the tied head matters only at a real vocabulary
        rows += [("head", "nn", N, D, V, 1), ("head dx", "nn", N, V, D, 1),
                 ("head dW", "tn", V, N, D, 1)]
    return [dict(name=n, kind=k, M=m, K=kk, N=nn, count=c) for n, k, m, kk, nn, c in rows]


def bench_product(p: dict, reps: int, rounds: int, with_torch: bool) -> dict:
    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    a_shape = (p["K"], p["M"]) if p["kind"] == "tn" else (p["M"], p["K"])
    a = rng.standard_normal(a_shape, dtype=np.float32)
    b = rng.standard_normal((p["K"], p["N"]), dtype=np.float32)
    f = (lambda x, y: x.T @ y) if p["kind"] == "tn" else (lambda x, y: x @ y)

    calls = {}
    A, B = jax.device_put(a), jax.device_put(b)
    for name, opts in (("xla_ynn", {}), ("xla_eigen", {"xla_cpu_experimental_ynn_fusion_type": ""})):
        compiled = jax.jit(f).lower(A, B).compile(compiler_options=opts)
        calls[name] = lambda c=compiled: c(A, B).block_until_ready()
    if with_torch:
        import torch
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        calls["torch"] = lambda: f(ta, tb)
    for call in calls.values():  # warm-up
        call()
        call()
    times = {k: [] for k in calls}
    for _ in range(rounds):
        for k, call in calls.items():
            time.sleep(0.05)  # let the previous engine's worker threads stop spinning
            times[k] += _timed(call, reps)
    gflop = 2.0 * p["M"] * p["K"] * p["N"] / 1e9
    row = {"product": p["name"], "shape_MKN": [p["M"], p["K"], p["N"]], "per_step": p["count"]}
    for k, ts in times.items():
        row[f"{k}_ms"] = round(1e3 * statistics.median(ts), 2)
        row[f"{k}_gflops"] = round(gflop / statistics.median(ts), 1)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", nargs="+", choices=sorted(CONFIGS), default=["b", "c"])
    ap.add_argument("--reps", type=int, default=3, help="calls per engine per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true", help="skip the torch reference")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.rounds < 1:
        print("error: --reps and --rounds must be >= 1", file=sys.stderr)
        return 2
    with_torch = not args.no_torch
    if with_torch:
        try:
            import torch
            torch.set_num_threads(os.cpu_count() or 1)
        except ImportError:
            with_torch = False
    for cfg in args.config:
        total: dict[str, float] = {}
        for p in products(CONFIGS[cfg]):
            row = bench_product(p, args.reps, args.rounds, with_torch)
            print(json.dumps({"config": cfg, **row}), flush=True)
            for k, v in row.items():
                if k.endswith("_ms"):
                    total[k] = total.get(k, 0.0) + v * p["count"]
        summary = {"config": cfg, "summary": "products of one training step",
                   **{f"total_{k}": round(v, 1) for k, v in total.items()}}
        if "torch_ms" in total:
            for k in ("xla_ynn_ms", "xla_eigen_ms"):
                summary[f"torch_over_{k[:-3]}"] = round(total["torch_ms"] / total[k], 3)
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
