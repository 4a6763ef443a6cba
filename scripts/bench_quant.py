"""int8 weight-only decode (jaxgpt/quant.py) against float32, side by side in one run.

    PYTHONPATH=. python scripts/bench_quant.py                       # 124M and 6L/384, B 1 8 64
    PYTHONPATH=. python scripts/bench_quant.py --model 124m --batch 1 --new-tokens 64
    PYTHONPATH=. python scripts/bench_quant.py --quick               # smoke run, seconds
    PYTHONPATH=. python scripts/bench_quant.py --quality out/stdlib_small out/shakespeare_char_cpu

--quality CKPT...: the quality cost instead of speed. For each trained run folder, the val loss
of the float32 model and of its int8 copy (`jaxgpt eval` and `jaxgpt eval --quantize int8`, the
same batches, every val batch the run's eval_steps cover) and their relative change. The two
models named are the embedded default job (`jaxgpt train`) and `jaxgpt train --config
configs/shakespeare_char_cpu.py` (after `jaxgpt prepare --input tinyshakespeare.txt --out
data/shakespeare_char --tokenizer byte`).

Random weights (vocabulary 50304 padded), greedy, prompt 64 tokens. For each (model, batch) the
float32 model and its int8 copy run alternately, --repeats times each, best kept: the machine's
speed swings (other processes, up to 2x), and alternating exposes both to the same swings. One
JSON line per (model, batch):
  float32 / int8: tokens_per_s (all rows, prefill included), decode_step_ms (one token for every
    row, wall), decode_cpu_ms (process CPU time per step: all threads; steadier than wall under
    load), weight_bytes_per_step (the arrays the decode loop reads: `decode_weights`, every
    matrix, bias, LayerNorm and the head; int8 matrices count their scales).
  int8_xla: the same int8 weights multiplied by XLA's own chunked products instead of the
    int8 kernel (jaxgpt/kernels/int8.py); int8_kernel says whether `int8` ran the kernel.
  speedup: int8 over float32 tokens/s; step_speedup: decode_step_ms ratio; bytes_ratio;
    speedup_xla / step_speedup_xla: the same for int8_xla.
  greedy_match: tokens equal to float32's from the start (min over rows; random weights give
    near-tied logits, so int8 may pick another token early).
  loadavg: the 1-minute load average before and after the pair of runs (2 cores here).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from bench_generate import MODELS  # the sibling script (scripts/ is sys.path[0] when run as a file)


def run(model, prompts, n_new, chunk):
    """(tokens per row, total seconds, decode seconds, decode CPU seconds, decode steps)."""
    from jaxgpt import generation as G

    calls0 = G.STATS["decode_calls"]
    out = [[] for _ in prompts]
    t0 = time.perf_counter()
    t_first = c_first = None
    for piece in G.generate(model, prompts, n_new, temperature=0, stream=True, chunk=chunk):
        if t_first is None:  # prefill + first token done
            t_first, c_first = time.perf_counter(), time.process_time()
        for row, new in zip(out, piece):
            row.extend(new)
    t1, c1 = time.perf_counter(), time.process_time()
    steps = (G.STATS["decode_calls"] - calls0) * min(chunk, 1 << max(n_new - 2, 0).bit_length())
    return out, t1 - t0, t1 - t_first, c1 - c_first, steps


def record(runs, n_rows, n_new, nbytes):
    out, total, dec, cpu, steps = min(runs, key=lambda r: r[2])
    return out, {"tokens_per_s": round(n_rows * n_new / min(r[1] for r in runs), 1),
                 "decode_step_ms": round(1e3 * dec / steps, 2),
                 "decode_cpu_ms": round(1e3 * min(r[3] for r in runs) / steps, 2),
                 "weight_bytes_per_step": int(nbytes)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["124m", "small"], choices=list(MODELS))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant (best is kept)")
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--no-xla", dest="xla", action="store_false",
                    help="leave out int8_xla (int8 through XLA's own products, not the kernel)")
    ap.add_argument("--quick", action="store_true", help="6L/384, B=1, 16 tokens: a smoke run")
    ap.add_argument("--quality", nargs="+", metavar="CKPT", help="val loss, float32 vs int8, of these runs")
    args = ap.parse_args()
    if args.quality:
        return quality(args.quality)
    if args.quick:
        args.model, args.batch, args.new_tokens, args.repeats = ["small"], [1], 16, 1

    from flax import nnx

    from jaxgpt import quant
    from jaxgpt.config import ModelConfig
    from jaxgpt.generation import decode_weights
    from jaxgpt.model import create_model

    rng = np.random.RandomState(0)
    for name in args.model:
        cfg = ModelConfig(**dict(MODELS[name], vocab_size=50304))
        models = {"float32": create_model(cfg, seed=0)}
        models["int8"] = quant.quantize_model(models["float32"])  # the kernel when it is built
        if args.xla:
            models["int8_xla"] = quant.quantize_model(models["float32"], kernel="xla")
        for B in args.batch:
            prompts = rng.randint(0, cfg.vocab_size, (B, args.prompt_len)).tolist()
            nbytes = {k: quant.weight_bytes(decode_weights(*nnx.split(m), B)) for k, m in models.items()}
            load0 = os.getloadavg()[0]
            for m in models.values():  # compile (not timed)
                run(m, prompts, args.new_tokens, args.chunk)
            runs = {k: [] for k in models}
            for r in range(args.repeats):
                for k in (list(models) if r % 2 == 0 else list(models)[::-1]):
                    runs[k].append(run(models[k], prompts, args.new_tokens, args.chunk))
            rec = {"model": name, "batch": B, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
            outs = {}
            for k in models:
                outs[k], rec[k] = record(runs[k], B, args.new_tokens, nbytes[k])
            f, q = rec["float32"], rec["int8"]
            rec["speedup"] = round(q["tokens_per_s"] / f["tokens_per_s"], 2)
            rec["step_speedup"] = round(f["decode_step_ms"] / q["decode_step_ms"], 2)
            rec["cpu_step_speedup"] = round(f["decode_cpu_ms"] / q["decode_cpu_ms"], 2)
            rec["bytes_ratio"] = round(f["weight_bytes_per_step"] / q["weight_bytes_per_step"], 2)
            if "int8_xla" in rec:
                rec["int8_kernel"] = quant.int8_kernel.use_kernel("auto")
                rec["speedup_xla"] = round(rec["int8_xla"]["tokens_per_s"] / f["tokens_per_s"], 2)
                rec["step_speedup_xla"] = round(f["decode_step_ms"] / rec["int8_xla"]["decode_step_ms"], 2)
            rec["greedy_match"] = min(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                                      for x, y in zip(outs["float32"], outs["int8"]))
            rec["loadavg"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
            print(json.dumps(rec), flush=True)


def quality(ckpts):
    """One JSON line per run folder: float32 and int8 val loss on the same batches."""
    from jaxgpt.evaluate import evaluate_checkpoint

    for ckpt in ckpts:
        t = time.perf_counter()
        f = evaluate_checkpoint(ckpt)
        q = evaluate_checkpoint(ckpt, quantize="int8")
        print(json.dumps({"ckpt": ckpt, "step": f["step"], "val_loss_float32": round(f["val_loss"], 5),
                          "val_loss_int8": round(q["val_loss"], 5),
                          "relative_change": round((q["val_loss"] - f["val_loss"]) / f["val_loss"], 5),
                          "train_loss_float32": round(f["train_loss"], 5), "train_loss_int8": round(q["train_loss"], 5),
                          "seconds": round(time.perf_counter() - t, 1)}), flush=True)


if __name__ == "__main__":
    main()
