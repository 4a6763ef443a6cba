"""Generation throughput: jaxgpt (KV cache + scan decode) vs a naive loop, HF transformers and the
memory-bandwidth bound. Random weights; greedy decoding; one JSON line per (model, batch).

    PYTHONPATH=. python scripts/bench_generate.py                     # everything (many minutes)
    PYTHONPATH=. python scripts/bench_generate.py --model 124m --batch 1 8 --new-tokens 256
    PYTHONPATH=. python scripts/bench_generate.py --quick             # smoke run, seconds
    PYTHONPATH=. python scripts/bench_generate.py --gpt2 [--batch 1 8] [--new-tokens 128]
        # GPT-2 interop runs: the GPT-2 124M weights (HF cache, else random) loaded into both
        # engines, greedy and top-p 0.9, prompt 64 (see scripts/bench_gpt2_generate.py)

Fields (times exclude compilation unless named compile_s):
  ours: tokens_per_s (all rows, prefill included), decode_step_ms (one token for every row),
    prefill_ms, compile_s (first call minus a warm call), cache_len.
  naive: nanoGPT's loop, a jitted full forward over a fixed padded window per token (no cache);
    its per-token cost is constant, so it is timed over a few tokens and reported per token.
    speedup_vs_naive compares tokens/s at --naive-new-tokens new tokens (ours re-run there).
  hf: transformers GPT2LMHeadModel.generate(use_cache=True, greedy) on the same weights;
    hf_match_prefix = tokens identical to ours from the start (min over rows).
  bound: bytes one decode step must read (every weight once + the KV cache's S slots) over the
    measured copy bandwidth (numpy copy: read + write bytes / time).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

MODELS = {
    "small": dict(vocab_size=50304, block_size=1024, n_layer=6, n_head=6, n_embd=384),
    "124m": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
}


def copy_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Bytes/s moved by a large numpy copy (read + write), best of `repeats`."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def run_ours(model, prompts, n_new, chunk):
    """(new tokens per row, prefill seconds, decode seconds, decode steps) of one warm call."""
    from jaxgpt import generation as G

    calls0 = G.STATS["decode_calls"]
    t0 = time.perf_counter()
    out = [[] for _ in prompts]
    t_prefill = None
    for piece in G.generate(model, prompts, n_new, temperature=0, stream=True, chunk=chunk):
        if t_prefill is None:
            t_prefill = time.perf_counter() - t0
        for row, new in zip(out, piece):
            row.extend(new)
    total = time.perf_counter() - t0
    calls = G.STATS["decode_calls"] - calls0
    n_steps = min(chunk, 1 << max(n_new - 2, 0).bit_length())
    return out, t_prefill, total - t_prefill, calls * n_steps


def ours_record(cold, best, n_rows, n_new):
    out, prefill, decode, steps = best
    warm = prefill + decode
    return out, {
        "tokens_per_s": round(n_rows * n_new / warm, 1),
        "decode_step_ms": round(1e3 * decode / steps, 2),
        "prefill_ms": round(1e3 * prefill, 1),
        "total_s": round(warm, 3),
        "compile_s": round(max(cold - warm, 0.0), 2),
    }


def bench_ours(model, prompts, n_new, chunk, repeats=2):
    t = time.perf_counter()
    run_ours(model, prompts, n_new, chunk)
    cold = time.perf_counter() - t
    runs = [run_ours(model, prompts, n_new, chunk) for _ in range(repeats)]
    return ours_record(cold, min(runs, key=lambda r: r[1] + r[2]), len(prompts), n_new)


def bench_naive(model, prompts, n_new, steps):
    """nanoGPT-style: full forward over a fixed (B, W) window per token, W = prompt + new."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    cfg = model.cfg
    B, P = len(prompts), len(prompts[0])
    W = min(cfg.block_size, P + n_new)
    graphdef, params = nnx.split(model)

    @jax.jit
    def step(params, window_BxW, pos):
        # Like nanoGPT at inference, the LM head runs on the one position that is needed.
        m = nnx.merge(graphdef, params)
        h_BxWxD = m.hidden(window_BxW)
        nxt = jnp.argmax(m.head(h_BxWxD[:, pos]), axis=-1).astype(jnp.int32)
        return jax.lax.dynamic_update_slice(window_BxW, nxt[:, None], (0, pos + 1))

    window = jnp.zeros((B, W), jnp.int32).at[:, :P].set(jnp.asarray(prompts, jnp.int32))
    t = time.perf_counter()
    window = step(params, window, P - 1).block_until_ready()
    first = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(steps):
        window = step(params, window, P + i).block_until_ready()
    per_token = (time.perf_counter() - t) / steps
    return {"tokens_per_s": round(B / per_token, 2), "step_ms": round(1e3 * per_token, 1),
            "window": W, "compile_s": round(max(first - per_token, 0.0), 2), "timed_steps": steps}


def hf_model(model):
    """transformers GPT-2 with our weights (same Conv1D (in, out) layout, fused qkv)."""
    import torch
    from flax import nnx
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.cfg
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True))
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    t = lambda a: torch.from_numpy(np.array(a, np.float32))  # a writable copy  # noqa: E731
    sd = {"transformer.wte.weight": t(p["wte"][:cfg.vocab_size]), "transformer.wpe.weight": t(p["wpe"]),
          "transformer.ln_f.weight": t(p["ln_f_scale"]), "transformer.ln_f.bias": t(p["ln_f_bias"])}
    b = p["blocks"]
    names = {"ln_1.weight": "ln1_scale", "ln_1.bias": "ln1_bias", "attn.c_attn.weight": "w_qkv",
             "attn.c_attn.bias": "b_qkv", "attn.c_proj.weight": "w_attn_out", "attn.c_proj.bias": "b_attn_out",
             "ln_2.weight": "ln2_scale", "ln_2.bias": "ln2_bias", "mlp.c_fc.weight": "w_fc",
             "mlp.c_fc.bias": "b_fc", "mlp.c_proj.weight": "w_mlp_out", "mlp.c_proj.bias": "b_mlp_out"}
    for i in range(cfg.n_layer):
        for hf_name, ours in names.items():
            sd[f"transformer.h.{i}.{hf_name}"] = t(b[ours][i])
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all(k == "lm_head.weight" or k.endswith(".attn.bias") or "masked_bias" in k
                                  for k in missing), (missing, unexpected)
    hf.tie_weights()
    hf.eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def bench_hf(hf, prompts, n_new):
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
              min_new_tokens=n_new, max_new_tokens=n_new)
    with torch.inference_mode():
        hf.generate(ids, **dict(kw, min_new_tokens=2, max_new_tokens=2))  # warm-up (allocator, kernels)
        t = time.perf_counter()
        out = hf.generate(ids, **kw)
        total = time.perf_counter() - t
    new = out[:, ids.shape[1]:].tolist()
    return new, {"tokens_per_s": round(len(prompts) * n_new / total, 1), "total_s": round(total, 3),
                 "torch_threads": torch.get_num_threads()}


def bound(model, batch, cache_len, bw):
    from flax import nnx
    import jax

    cfg = model.cfg
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    weights -= model.wpe[...].nbytes  # a step reads B position rows, not the table
    kv = 2 * cfg.n_layer * batch * cache_len * cfg.n_embd * np.dtype(model.dtype).itemsize
    return weights + kv


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["small", "124m"], choices=list(MODELS))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--naive-new-tokens", type=int, default=512)
    ap.add_argument("--naive-steps", type=int, default=3, help="timed naive tokens (constant cost each)")
    ap.add_argument("--naive-max-batch", type=int, default=8, help="skip the naive loop above this batch")
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per engine (best is kept)")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small model, B=1, 32 tokens: a smoke run")
    ap.add_argument("--gpt2", action="store_true",
                    help="the GPT-2 interop runs (greedy and top-p vs transformers on GPT-2 weights)")
    args = ap.parse_args()
    if args.gpt2:
        import sys

        import bench_gpt2_generate  # the sibling script (scripts/ is sys.path[0] when run as a file)
        batches = args.batch if args.batch != [1, 8, 64] else [1, 8]
        new = args.new_tokens if args.new_tokens != 256 else 128
        sys.argv = [sys.argv[0], "--batch", *map(str, batches), "--prompt", str(args.prompt_len),
                    "--new", str(new), "--repeats", str(args.repeats)]
        return bench_gpt2_generate.main()
    if args.quick:
        args.model, args.batch, args.new_tokens, args.naive_new_tokens = ["small"], [1], 32, 64
        args.naive_steps, args.repeats = 1, 1

    from jaxgpt.config import ModelConfig
    from jaxgpt.generation import bucket
    from jaxgpt.model import create_model

    hf_ok = not args.no_hf
    if hf_ok:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            hf_ok = False
    bw = copy_bandwidth()
    rng = np.random.RandomState(0)
    for name in args.model:
        cfg = ModelConfig(**MODELS[name])
        model = create_model(cfg, seed=0)
        hf = hf_model(model) if hf_ok else None
        for B in args.batch:
            prompts = rng.randint(0, cfg.vocab_size, (B, args.prompt_len)).tolist()
            S = min(bucket(args.prompt_len + args.new_tokens), cfg.block_size)
            # Ours and transformers alternate, best of --repeats each, so a burst of load from
            # other processes hits both rather than one.
            t = time.perf_counter()
            run_ours(model, prompts, args.new_tokens, args.chunk)
            cold = time.perf_counter() - t
            ours_runs, hf_runs = [], []
            for _ in range(args.repeats):
                ours_runs.append(run_ours(model, prompts, args.new_tokens, args.chunk))
                if hf is not None:
                    hf_runs.append(bench_hf(hf, prompts, args.new_tokens))
            out, ours = ours_record(cold, min(ours_runs, key=lambda r: r[1] + r[2]), B, args.new_tokens)
            ours["cache_len"] = S
            rec = {"model": name, "batch": B, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                   "ours": ours}
            bw = max(bw, copy_bandwidth(1 << 28, 3))  # re-measured next to each run: load varies
            nbytes = bound(model, B, S, bw)
            bound_ms = 1e3 * nbytes / bw
            rec["bound"] = {"bytes_per_step": int(nbytes), "copy_gb_per_s": round(bw / 1e9, 2),
                            "bound_ms": round(bound_ms, 2),
                            "step_over_bound": round(ours["decode_step_ms"] / bound_ms, 2)}
            if hf is not None:
                hf_out, rec["hf"] = max(hf_runs, key=lambda r: r[1]["tokens_per_s"])
                rec["hf"]["speedup"] = round(ours["tokens_per_s"] / rec["hf"]["tokens_per_s"], 2)
                rec["hf"]["hf_match_prefix"] = min(
                    next((i for i, (a, b) in enumerate(zip(o, h)) if a != b), len(o)) for o, h in zip(out, hf_out))
            if not args.no_naive and B <= args.naive_max_batch:
                n = args.naive_new_tokens
                rec["naive"] = bench_naive(model, prompts, n, args.naive_steps)
                _, at_n = bench_ours(model, prompts, n, args.chunk) if n != args.new_tokens else (None, ours)
                rec["naive"]["ours_tokens_per_s"] = at_n["tokens_per_s"]
                rec["naive"]["new_tokens"] = n
                rec["naive"]["speedup_vs_naive"] = round(at_n["tokens_per_s"] / rec["naive"]["tokens_per_s"], 1)
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
