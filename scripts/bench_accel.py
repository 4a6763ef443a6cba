"""Accelerator benchmarks for scripts/device_check.sh: the 124M train step and bf16 generation.

    PYTHONPATH=. python scripts/bench_accel.py [train] [generate] [--out DIR] [--dry-run]

Prints one JSON line per measurement (and appends them to DIR/bench_accel.jsonl):
- train: GPT-2 124M (12 x 768, T = 1024, vocabulary 50304), bf16, one micro-batch of 16 x 1024,
  for attention = xla and cudnn and remat = none, dots, full: tokens/s, MFU against the device's
  spec-sheet bf16 peak (FLOPs per token 6N + 12 L T D, nanoGPT's estimate), peak device memory.
- generate: random GPT-2 124M weights, prompt 64, 256 new tokens, greedy, B = 1, 8, 64: ms per
  decode step (256 steps timed after a warm-up call; prefill excluded) against the HBM roofline
  (bytes of weights + the KV cache read per step, over 3.35 TB/s, the H100 SXM's bandwidth, and
  over the device's own where known), and prefill tokens/s. In bfloat16 with the default backend;
  and in float32 with attention=xla (the reference decode) vs attention=cpu (the CPU kernels'
  layouts: head-major cache, transposed activations), which the issue asks to measure on a GPU
  before keeping them there.
- mesh: the 124M train step (bf16, remat=full, one micro-batch of 16 x 1024) under the training
  loop's two strategies, `parallel=pmap` and `parallel=mesh mesh.data=-1`: tokens/s each.
- decoding: bf16 GPT-2 124M (random weights), prompt 64, 128 new tokens, through
  `jaxgpt.generate`: int8 weight-only against bf16 at B = 1, 8, 64; beam search K=4 at B = 1, 8;
  speculative decoding (k=4) at B = 1 with a random 4 x 128 draft (acceptance ~0: the cost of a
  round) and with the target as its own draft (acceptance 1: the ceiling), against plain greedy.
--dry-run: the same code on tiny shapes and few steps, on any backend (the suite runs it on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jaxgpt  # noqa: F401  (first: process-wide CPU settings before jax starts)

HBM_TBPS = 3.35  # H100 SXM, the roofline
_DEVICE_TBPS = {"nvidia h100 80gb hbm3": 3.35, "nvidia h100 pcie": 2.0, "nvidia h200": 4.8,
                "nvidia a100-sxm4-80gb": 2.04, "nvidia a100-sxm4-40gb": 1.56}


def _emit(row: dict, out: str | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(os.path.join(out, "bench_accel.jsonl"), "a") as f:
            f.write(line + "\n")


def _device():
    import jax
    d = jax.devices()[0]
    return d, d.device_kind


def _peak_bytes(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # some backends (CPU) have none
        return None
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


def _spec_peak(kind: str, dtype: str) -> float | None:
    try:
        from jaxgpt.metrics import spec_peak
    except ImportError:
        return None
    return spec_peak(kind, dtype)


def bench_train(attentions, remats, dry: bool, out: str | None) -> None:
    from functools import partial

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxgpt.config import Config, ModelConfig
    from jaxgpt.model import count_params, create_model
    from jaxgpt.train.step import build_optimizer, flops_per_token, init_train_state, train_step

    if dry:
        mcfg, micro, steps = ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64), 2, 2
    else:
        mcfg, micro, steps = ModelConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12,
                                         n_embd=768), 16, 10
    device, kind = _device()
    T = mcfg.block_size
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(0, mcfg.vocab_size, (1, micro, T + 1)), jnp.int32),
             "mask": jnp.ones((1, micro, T), jnp.float32)}
    for attention in attentions:
        for remat in remats:
            row = {"bench": "train_124m" if not dry else "train_dry", "device": kind, "dtype": "bfloat16",
                   "attention": attention, "remat": remat, "micro_batch": micro, "block_size": T}
            try:
                cfg = Config(model=mcfg, dtype="bfloat16", attention=attention, remat=remat,
                             warmup_steps=0, max_steps=1000)
                model = create_model(mcfg, 0, "bfloat16", attention, remat)
                graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model))
                tx = build_optimizer(cfg)
                state = init_train_state(params, tx, 0)
                del model, params
                step = jax.jit(partial(train_step, graphdef=graphdef, tx=tx, task="lm", axis_name=None),
                               donate_argnums=(0,))
                t0 = time.perf_counter()
                state, m = step(state, batch)
                jax.block_until_ready(m)
                compile_s = time.perf_counter() - t0
                state, m = step(state, batch)  # one more warm step
                jax.block_until_ready(m)
                t0 = time.perf_counter()
                for _ in range(steps):
                    state, m = step(state, batch)
                jax.block_until_ready((state, m))
                dt = (time.perf_counter() - t0) / steps
                tps = micro * T / dt
                n_params = count_params(nnx.eval_shape(lambda: create_model(mcfg, 0, "bfloat16")))
                flops = flops_per_token(cfg, n_params)
                peak = _spec_peak(kind, "bfloat16")
                row.update(ms_per_step=round(1e3 * dt, 2), tokens_per_s=round(tps), loss=float(m["loss"]),
                           mfu=None if peak is None else round(tps * flops / peak, 4),
                           peak_flops=peak, peak_memory_bytes=_peak_bytes(device),
                           compile_s=round(compile_s, 1))
                del state
            except Exception as e:  # one failing variant (OOM, an unsupported backend) must not end the check
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            _emit(row, out)


def bench_generate(batches, variants, dry: bool, out: str | None) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxgpt.config import ModelConfig
    from jaxgpt.generation import engine
    from jaxgpt.generation.sampling import SamplingFlags, SamplingParams
    from jaxgpt.model import count_params, create_model, init_cache

    if dry:
        mcfg, P, N, chunk = ModelConfig(vocab_size=256, block_size=128, n_layer=2, n_head=2, n_embd=64), 8, 16, 8
    else:
        mcfg, P, N, chunk = ModelConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12,
                                        n_embd=768), 64, 256, 32
    device, kind = _device()
    tbps = _DEVICE_TBPS.get(" ".join(kind.lower().split()))
    for dtype, attention in variants:
        for B in batches:
            row = {"bench": "generate_124m" if not dry else "generate_dry", "device": kind,
                   "dtype": dtype, "attention": attention, "batch": B, "prompt": P, "new_tokens": N}
            try:
                model = create_model(mcfg, 0, dtype, attention)
                row["backend"] = model.attention
                graphdef, params = nnx.split(model)
                S = engine.bucket(P + N)
                rng = np.random.default_rng(1)
                tokens = jnp.asarray(rng.integers(0, mcfg.vocab_size, (B, P)), jnp.int32)
                lengths = jnp.full((B,), P, jnp.int32)

                def start():
                    logits, cache = engine.prefill(graphdef, params, tokens, lengths,
                                                   init_cache(mcfg, B, S, model.dtype))
                    return engine.init_decode_state(
                        logits, cache, tokens, lengths, jnp.full((B,), N + 1), jnp.full((B,), -1),
                        jnp.arange(B), jax.random.key(0), SamplingParams.make(B, 0.0),
                        flags=SamplingFlags(sample=False), windowed=False, history_len=1)

                jax.block_until_ready(start())  # compile prefill
                t0 = time.perf_counter()
                reps = 3
                for _ in range(reps):
                    state, _ = start()
                jax.block_until_ready(state)
                prefill_s = (time.perf_counter() - t0) / reps
                weights = engine.decode_weights(graphdef, params, B)
                state, _ = engine.decode(graphdef, params, state, chunk, weights=weights)  # compile
                jax.block_until_ready(state)
                state, _ = start()
                t0 = time.perf_counter()
                for _ in range(N // chunk):
                    state, toks = engine.decode(graphdef, params, state, chunk, weights=weights)
                jax.block_until_ready(toks)
                step_s = (time.perf_counter() - t0) / (N // chunk * chunk)
                itemsize = jnp.dtype(model.dtype).itemsize
                n_params = count_params(model, non_embedding=False)
                weight_bytes = n_params * itemsize
                # the cache read per step, at the mean length of the timed steps
                cache_bytes = 2 * mcfg.n_layer * B * (P + N / 2) * mcfg.n_embd * itemsize
                bound_s = (weight_bytes + cache_bytes) / (HBM_TBPS * 1e12)
                row.update(ms_per_step=round(1e3 * step_s, 4), tokens_per_s=round(B / step_s, 1),
                           prefill_tokens_per_s=round(B * P / prefill_s), weight_bytes=weight_bytes,
                           cache_bytes=int(cache_bytes), roofline_ms_3_35=round(1e3 * bound_s, 4),
                           fraction_of_roofline_3_35=round(bound_s / step_s, 3))
                if tbps:
                    dev_bound = (weight_bytes + cache_bytes) / (tbps * 1e12)
                    row.update(device_tbps=tbps, fraction_of_device_roofline=round(dev_bound / step_s, 3))
                del model, params, state
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            _emit(row, out)


def bench_mesh(dry: bool, out: str | None) -> None:
    """parallel=pmap vs parallel=mesh mesh.data=-1 on every local device: the loop's strategies."""
    import dataclasses

    import jax
    import numpy as np
    from flax import nnx

    from jaxgpt.config import Config, MeshConfig, ModelConfig
    from jaxgpt.model import create_model
    from jaxgpt.train import parallel
    from jaxgpt.train.step import build_optimizer, init_train_state

    if dry:
        mcfg, micro, steps = ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64), 2, 2
    else:
        mcfg, micro, steps = ModelConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12,
                                         n_embd=768), 16, 10
    _, kind = _device()
    n = jax.device_count()
    rng = np.random.default_rng(0)
    rows = {"tokens": rng.integers(0, mcfg.vocab_size, (micro * n, mcfg.block_size + 1)).astype(np.int32),
            "mask": np.ones((micro * n, mcfg.block_size), np.float32)}
    base = Config(model=mcfg, dtype="bfloat16", remat="full", batch_size=micro * n, warmup_steps=0,
                  max_steps=1000)
    for name, cfg in (("pmap", base), ("mesh", dataclasses.replace(base, parallel="mesh", mesh=MeshConfig(data=-1)))):
        row = {"bench": "train_mesh" if not dry else "train_mesh_dry", "device": kind, "devices": n,
               "parallel": name, "dtype": "bfloat16", "remat": "full", "micro_batch": micro}
        try:
            model = create_model(mcfg, 0, "bfloat16", remat="full")
            graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
            st = parallel.create(cfg, graphdef)
            state = st.place(init_train_state(params, build_optimizer(cfg), 0))
            del model, params
            batch = st.shard_batch(rows, cfg.batch_size)
            t0 = time.perf_counter()
            state, m = st.step(state, batch)
            jax.block_until_ready(m)
            compile_s = time.perf_counter() - t0
            state, m = st.step(state, batch)
            jax.block_until_ready(m)
            t0 = time.perf_counter()
            for _ in range(steps):
                state, m = st.step(state, batch)
            jax.block_until_ready((state, m))
            dt = (time.perf_counter() - t0) / steps
            row.update(ms_per_step=round(1e3 * dt, 2), tokens_per_s=round(cfg.batch_size * mcfg.block_size / dt),
                       loss=float(st.host(m)["loss"]), compile_s=round(compile_s, 1))
            del state
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        _emit(row, out)


def bench_decoding(dry: bool, out: str | None) -> None:
    """int8 vs bf16 decode, beam search, speculative decoding, all through jaxgpt.generate."""
    import numpy as np

    from jaxgpt import quant
    from jaxgpt.config import ModelConfig
    from jaxgpt.generation import generate
    from jaxgpt.model import create_model

    if dry:
        mcfg, dcfg, P, N, batches = (ModelConfig(vocab_size=256, block_size=128, n_layer=2, n_head=2, n_embd=64),
                                     ModelConfig(vocab_size=256, block_size=128, n_layer=1, n_head=2, n_embd=32),
                                     8, 8, [2])
    else:
        mcfg, dcfg, P, N, batches = (ModelConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
                                     ModelConfig(vocab_size=50257, block_size=1024, n_layer=4, n_head=4, n_embd=128),
                                     64, 128, [1, 8, 64])
    _, kind = _device()
    target = create_model(mcfg, 0, "bfloat16")
    rng = np.random.default_rng(2)

    def timed(fn, reps=2):
        fn()  # compile
        t0 = time.perf_counter()
        for _ in range(reps):
            r = fn()
        return (time.perf_counter() - t0) / reps, r

    def emit(**row):
        _emit({"bench": "decoding" if not dry else "decoding_dry", "device": kind, "dtype": "bfloat16",
               "prompt": P, "new_tokens": N, **row}, out)

    try:
        q_target = quant.quantize_model(target, "int8")
        for B in batches:
            prompts = rng.integers(0, mcfg.vocab_size, (B, P)).tolist()
            t_b, _ = timed(lambda: generate(target, prompts, N, temperature=0))
            t_q, _ = timed(lambda: generate(q_target, prompts, N, temperature=0))
            emit(what="int8", batch=B, bf16_tok_s=round(B * N / t_b, 1), int8_tok_s=round(B * N / t_q, 1),
                 speedup=round(t_b / t_q, 2))
        for B in batches[:2]:
            prompts = rng.integers(0, mcfg.vocab_size, (B, P)).tolist()
            t_g, _ = timed(lambda: generate(target, prompts, N, temperature=0))
            t_k, _ = timed(lambda: generate(target, prompts, N, num_beams=4))
            emit(what="beam4", batch=B, greedy_tok_s=round(B * N / t_g, 1), beam_tok_s=round(B * N / t_k, 1))
        prompts = rng.integers(0, mcfg.vocab_size, (1, P)).tolist()
        t_g, _ = timed(lambda: generate(target, prompts, N, temperature=0))
        for name, draft in (("random_draft", create_model(dcfg, 1, "bfloat16")), ("self_draft", target)):
            t_s, (_, stats) = timed(lambda: generate(target, prompts, N, temperature=0, draft=draft,
                                                     num_draft=4, return_stats=True))
            emit(what="speculative", draft=name, batch=1, k=4, greedy_tok_s=round(N / t_g, 1),
                 spec_tok_s=round(N / t_s, 1), speedup=round(t_g / t_s, 2),
                 accept_rate=round(stats.acceptance_rate, 3))
    except Exception as e:
        emit(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="*", help="train, generate, mesh, decoding (default: all)")
    ap.add_argument("--out", default=None, help="folder for bench_accel.jsonl")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, any backend (CPU in the suite)")
    ap.add_argument("--attention", nargs="+", default=None)
    ap.add_argument("--remat", nargs="+", default=None, help="default: none dots full (dry run: full)")
    ap.add_argument("--batch", nargs="+", type=int, default=None, help="default: 1 8 64 (dry run: 2)")
    args = ap.parse_args()
    known = ["train", "generate", "mesh", "decoding"]
    args.what = args.what or known
    if set(args.what) - set(known):
        ap.error(f"unknown benchmark(s) {sorted(set(args.what) - set(known))}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    import jax
    on_gpu = jax.default_backend() == "gpu"
    # A dry run exercises every code path once, on the fewest shapes (each one is a compile).
    remats = args.remat or (["full"] if args.dry_run else ["none", "dots", "full"])
    batches = args.batch or ([2] if args.dry_run else [1, 8, 64])
    if "train" in args.what:
        attentions = args.attention or (["xla", "cudnn"] if on_gpu else ["xla"])
        bench_train(attentions, remats, args.dry_run, args.out)
    if "generate" in args.what:
        variants = [("bfloat16", "auto"), ("float32", "xla"), ("float32", "cpu")]
        bench_generate(batches, variants, args.dry_run, args.out)
    if "mesh" in args.what:
        bench_mesh(args.dry_run, args.out)
    if "decoding" in args.what:
        bench_decoding(args.dry_run, args.out)


if __name__ == "__main__":
    main()
