"""Scale proof on paper: per-device memory of the GPT-2 train step per layout, nothing allocated.

    PYTHONPATH=. python scripts/bench_scale.py [--models 124m 355m 774m 1.5b]
        [--layouts pmap fsdp:8 fsdp:4,tensor:2] [--micro 8] [--remat full] [--budget-gb 80]

For each GPT-2 shape (block 1024, vocabulary 50257 padded to 50304, bf16 compute, float32
params and AdamW state) and each layout over 8 simulated CPU devices, the real train step
(`jaxgpt.train.parallel`'s pmapped or mesh-jitted `train_step`, donation included) is lowered
on abstract inputs (`jax.eval_shape` / ShapeDtypeStructs: no array is ever allocated) and
compiled; XLA's `memory_analysis()` then gives the per-device bytes of its arguments, outputs
and temporaries. attention=xla (the cpu kernels are float32-only), `--micro` sequences of 1024
tokens per batch block and micro-step (pmap: per device; fsdp:8: per device; fsdp:4,tensor:2:
per tensor pair), one micro-step.

One JSON line per (model, layout): argument_bytes, output_bytes, temp_bytes, alias_bytes (the
donated state, counted in both arguments and outputs), peak_bytes = arguments + outputs +
temporaries - aliased, fits (peak <= --budget-gb), compile_s. Then one line per layout with the
largest model that fits, and one line with the target: 1.5B under fsdp:8 needs <= 1/6 of pmap's
per-device argument bytes and fits. XLA:CPU's temporaries are a proxy for a GPU's (other
fusion and scheduling choices), the arguments are exact.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "jax" not in sys.modules:  # 8 simulated devices, before jax starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jaxgpt  # noqa: E402,F401  (process-wide CPU settings before jax starts)

MODELS = {  # GPT-2 sizes: (n_layer, n_head, n_embd)
    "124m": (12, 12, 768),
    "355m": (24, 16, 1024),
    "774m": (36, 20, 1280),
    "1.5b": (48, 25, 1600),
}
LAYOUTS = ("pmap", "fsdp:8", "fsdp:4,tensor:2")


def build_config(model: str, layout: str, micro: int, remat: str):
    from jaxgpt.config import Config, MeshConfig, ModelConfig
    from jaxgpt.train.parallel import parse_mesh_flag

    L, H, D = MODELS[model]
    mcfg = ModelConfig(vocab_size=50257, block_size=1024, n_layer=L, n_head=H, n_embd=D)
    if layout == "pmap":
        return Config(model=mcfg, batch_size=micro * 8, dtype="bfloat16", attention="xla", remat=remat)
    sizes = parse_mesh_flag(layout, 8)
    blocks = sizes["data"] * sizes["fsdp"]
    return Config(model=mcfg, batch_size=micro * blocks, dtype="bfloat16", attention="xla", remat=remat,
                  parallel="mesh", mesh=MeshConfig(**sizes))


def lowered(cfg):
    """The train step of `cfg`, lowered on abstract state and batch (nothing allocated)."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxgpt.model import abstract_model
    from jaxgpt.train import parallel

    graphdef = nnx.graphdef(abstract_model(cfg.model, cfg.dtype, cfg.attention, cfg.remat))
    strategy = parallel.create(cfg, graphdef)
    state = strategy.abstract_state()
    T = cfg.model.block_size + 1
    if cfg.parallel == "pmap":
        n = strategy.n_local
        lead = lambda a: jax.ShapeDtypeStruct((n, *a.shape), a.dtype)  # noqa: E731
        micro = cfg.batch_size // n
        batch = {"tokens": jax.ShapeDtypeStruct((n, 1, micro, T), np.int32),
                 "mask": jax.ShapeDtypeStruct((n, 1, micro, T - 1), np.float32)}
        return strategy._step.lower(jax.tree.map(lead, state), batch)
    batch = {"tokens": jax.ShapeDtypeStruct((1, cfg.batch_size, T), np.int32),
             "mask": jax.ShapeDtypeStruct((1, cfg.batch_size, T - 1), np.float32)}
    return strategy._step.lower(state, batch)


def measure(model: str, layout: str, micro: int, remat: str, budget: float) -> dict:
    from jaxgpt.errors import UserError
    from jaxgpt.model import abstract_model, count_params

    cfg = build_config(model, layout, micro, remat)
    row = {"model": model, "layout": layout, "micro_batch": micro, "block": 1024, "remat": remat,
           "dtype": "bfloat16", "params": count_params(abstract_model(cfg.model, "bfloat16", "xla"),
                                                       non_embedding=False)}
    t0 = time.perf_counter()
    try:
        compiled = lowered(cfg).compile()
    except UserError as e:  # a layout this model cannot take (e.g. 25 heads over tensor=2)
        return {**row, "skipped": str(e)}
    m = compiled.memory_analysis()
    args, outs, temp = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
    alias = m.alias_size_in_bytes
    peak = args + outs + temp - alias
    return {**row, "argument_bytes": args, "output_bytes": outs, "temp_bytes": temp,
            "alias_bytes": alias, "peak_bytes": peak, "peak_gb": round(peak / 1e9, 2),
            "fits": peak <= budget * 1e9, "compile_s": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
    p.add_argument("--micro", type=int, default=8, help="sequences per batch block (see the docstring)")
    p.add_argument("--remat", default="full", choices=["none", "dots", "full"])
    p.add_argument("--budget-gb", type=float, default=80.0)
    args = p.parse_args(argv)

    import jax
    assert jax.device_count() == 8, "bench_scale needs 8 devices (it sets the CPU flag itself)"
    rows = []
    for layout in args.layouts:
        for model in args.models:
            row = measure(model, layout, args.micro, args.remat, args.budget_gb)
            rows.append(row)
            print(json.dumps(row), flush=True)
    for layout in args.layouts:
        mine = [r for r in rows if r["layout"] == layout]
        fit = [r["model"] for r in mine if r.get("fits")]
        print(json.dumps({"layout": layout, "largest_fitting": fit[-1] if fit else None,
                          "budget_gb": args.budget_gb,
                          "not_applicable": [r["model"] for r in mine if "skipped" in r]}), flush=True)
    by = {(r["model"], r["layout"]): r for r in rows}
    big, rep = by.get(("1.5b", "fsdp:8")), by.get(("1.5b", "pmap"))
    if big and rep and "argument_bytes" in big and "argument_bytes" in rep:
        ratio = big["argument_bytes"] / rep["argument_bytes"]
        print(json.dumps({"target": "1.5b fsdp:8 argument bytes <= 1/6 of pmap's and fits",
                          "ratio": round(ratio, 4), "fits": big["fits"],
                          "met": ratio <= 1 / 6 and big["fits"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
