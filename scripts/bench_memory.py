"""Device memory of one training step, per remat setting, from the compiler: nothing is allocated.

    PYTHONPATH=. python scripts/bench_memory.py [--preset gpt2_124m] [--micro 16] [--remat none dots full]

For each remat setting it builds the real train step (`jaxgpt.train.step.train_step`, one
device, one micro-batch) of the preset's model, lowers it on abstract inputs
(`jax.ShapeDtypeStruct`s from `jax.eval_shape`) and prints the compiled program's
`memory_analysis()` as one JSON line: bytes of arguments (params, optimizer state, batch),
outputs, and temporaries (activations kept for the backward, gradients, workspace).

The issue's shape: GPT-2 124M (12 layers x 768, T = 1024, vocabulary 50257 padded to 50304),
bfloat16 compute, one micro-batch of 16 x 1024 tokens, attention=xla (the materialising form,
which is what XLA:CPU compiles; cuDNN's flash attention would store less). Targets: temporaries
<= 6 GB with remat=full, and >= 3x that with remat=none.
"""

from __future__ import annotations

import argparse
import json
import time

import jaxgpt  # noqa: F401  (first: process-wide CPU settings before jax starts)


def step_memory(model_cfg, micro_batch: int, dtype: str = "bfloat16", remat: str = "none",
                attention: str = "xla") -> dict:
    """memory_analysis() of one train step of `model_cfg` at `micro_batch` rows, as a dict."""
    from functools import partial

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxgpt.config import Config
    from jaxgpt.model import create_model
    from jaxgpt.train.step import build_optimizer, init_train_state, train_step

    cfg = Config(model=model_cfg, dtype=dtype, remat=remat, attention=attention)
    abstract = nnx.eval_shape(lambda: create_model(model_cfg, 0, dtype, attention, remat))
    graphdef = nnx.graphdef(abstract)
    tx = build_optimizer(cfg)
    state = jax.eval_shape(lambda: init_train_state(
        nnx.to_pure_dict(nnx.state(create_model(model_cfg, 0, dtype, attention, remat))), tx, 0))
    T = model_cfg.block_size
    batch = {"tokens": jax.ShapeDtypeStruct((1, micro_batch, T + 1), jnp.int32),
             "mask": jax.ShapeDtypeStruct((1, micro_batch, T), jnp.float32)}
    step = jax.jit(partial(train_step, graphdef=graphdef, tx=tx, task="lm", axis_name=None),
                   donate_argnums=(0,))
    t0 = time.perf_counter()
    m = step.lower(state, batch).compile().memory_analysis()
    return {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
            "compile_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    from jaxgpt.config import ModelConfig, apply_overrides, Config, load_preset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2_124m")
    ap.add_argument("--vocab", type=int, default=50257, help="the data's vocabulary (GPT-2: 50257)")
    ap.add_argument("--micro", type=int, default=16, help="rows per micro-batch")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attention", default="xla")
    ap.add_argument("--remat", nargs="+", default=["none", "dots", "full"])
    args = ap.parse_args()
    cfg = apply_overrides(Config(), load_preset(args.preset))
    mcfg: ModelConfig = apply_overrides(cfg, {"model.vocab_size": args.vocab}).model
    rows = {}
    for remat in args.remat:
        r = step_memory(mcfg, args.micro, args.dtype, remat, args.attention)
        rows[remat] = r
        print(json.dumps({"bench": "memory", "preset": args.preset, "n_layer": mcfg.n_layer,
                          "n_embd": mcfg.n_embd, "block_size": mcfg.block_size,
                          "vocab_padded": mcfg.padded_vocab, "micro_batch": args.micro,
                          "dtype": args.dtype, "attention": args.attention, "remat": remat, **r,
                          "temp_gb": round(r["temp_bytes"] / 1e9, 3)}), flush=True)
    if "none" in rows and "full" in rows:
        print(json.dumps({"bench": "memory_ratio", "none_over_full_temp":
                          round(rows["none"]["temp_bytes"] / rows["full"]["temp_bytes"], 2),
                          "full_temp_gb": round(rows["full"]["temp_bytes"] / 1e9, 3),
                          "target_full_le_gb": 6.0, "target_ratio_ge": 3.0}))


if __name__ == "__main__":
    main()
