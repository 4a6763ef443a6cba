"""Training-step throughput: jaxgpt's real train step vs transformers GPT-2 + torch AdamW.

    PYTHONPATH=. python scripts/bench_train.py [--config a b c] [--steps N] [--no-torch]
        [--parallel pmap mesh]

Prints one JSON line per config: ms/step and tokens/s of our step (compile and warm-up
excluded, median over --steps timed steps) and, when torch and transformers are installed, the
same for `GPT2LMHeadModel` trained with `torch.optim.AdamW` on the same shapes and batch, with
ratio = ours tokens/s / torch tokens/s.

What is measured on our side is the step exactly as `jaxgpt.trainer` runs it: `train_step`
pmapped over one device with the state donated, the optimizer from `build_optimizer(Config)`
(AdamW with the warmup/cosine schedule, weight-decay mask and global-norm clipping), float32,
dropout 0, one micro-batch. The torch side does the same work: forward, next-token
cross-entropy (mean over tokens), backward, clip_grad_norm_, AdamW step, zero_grad; float32,
dropout 0, `torch.set_num_threads(cpu_count)`. Both see the same token batch.

One device on purpose: the 8-simulated-device flag the tests use would split the 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jaxgpt  # noqa: F401  (first: the package sets its XLA CPU flags before jax starts)

CONFIGS = {
    # name: (n_layer, n_head, n_embd, block_size, batch_size, vocab_size)
    "a": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, vocab_size=65),
    "b": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8, vocab_size=65),
    "c": dict(n_layer=12, n_head=12, n_embd=768, block_size=256, batch_size=4, vocab_size=50304),
}
DEFAULT_STEPS = {"a": 50, "b": 12, "c": 6}


def _tokens(spec: dict, seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed)
    return rng.integers(0, spec["vocab_size"], (spec["batch_size"], spec["block_size"] + 1),
                        dtype=np.int32)


def _timed(step, n: int) -> list[float]:
    """Seconds of each of n calls of `step` (which must block until its result is ready)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def setup_jax(spec: dict, parallel: str = "pmap"):
    """(step, info): `step()` runs one real training step and blocks until it is done.
    parallel="mesh": the `parallel=mesh mesh.data=-1` step (jit over a one-device mesh)."""
    from functools import partial

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jaxgpt.config import Config, ModelConfig
    from jaxgpt.model import create_model
    from jaxgpt.train import AXIS, build_optimizer, init_train_state, shard_batch, train_step

    mcfg = ModelConfig(vocab_size=spec["vocab_size"], block_size=spec["block_size"],
                       n_layer=spec["n_layer"], n_head=spec["n_head"], n_embd=spec["n_embd"],
                       dropout=0.0, bias=True)
    cfg = Config(model=mcfg, batch_size=spec["batch_size"], grad_accum=1, dtype="float32")
    graphdef, params = nnx.split(create_model(mcfg, cfg.seed, jnp.float32), nnx.Param)
    tx = build_optimizer(cfg)
    state = init_train_state(nnx.to_pure_dict(params), tx, cfg.seed)

    if parallel == "mesh":
        return _setup_mesh(cfg, graphdef, state, spec)
    # Exactly the trainer's placement: a leading device axis, pmap over one device, donation.
    devices = jax.local_devices()[:1]
    rep = NamedSharding(Mesh(np.array(devices), (AXIS,)), PartitionSpec(AXIS))
    state = jax.device_put(jax.tree.map(lambda x: np.asarray(x)[None], state), rep)
    toks = _tokens(spec)
    batch = {"tokens": toks, "mask": np.ones((toks.shape[0], toks.shape[1] - 1), np.float32)}
    batch = jax.device_put(shard_batch(batch, 1, 1), rep)
    p_step = jax.pmap(partial(train_step, graphdef=graphdef, tx=tx, task="lm"),
                      axis_name=AXIS, donate_argnums=(0,), devices=devices)
    box = {"state": state, "losses": []}

    def step():
        box["state"], m = p_step(box["state"], batch)
        jax.block_until_ready((box["state"], m))
        box["losses"].append(float(m["loss"][0]))

    t0 = time.perf_counter()
    step()  # compiles
    return step, {"compile_s": time.perf_counter() - t0, "losses": box["losses"]}


def _setup_mesh(cfg, graphdef, state, spec: dict):
    """The training loop's mesh strategy (jaxgpt/train/parallel.py) on the first device."""
    import dataclasses

    import jax
    import numpy as np

    from jaxgpt.config import MeshConfig
    from jaxgpt.train.parallel import MeshStrategy

    cfg = dataclasses.replace(cfg, parallel="mesh", mesh=MeshConfig(data=-1))
    strategy = MeshStrategy(cfg, graphdef, devices=jax.local_devices()[:1])
    toks = _tokens(spec)
    rows = {"tokens": toks, "mask": np.ones((toks.shape[0], toks.shape[1] - 1), np.float32)}
    batch = strategy.shard_batch(rows, toks.shape[0])
    box = {"state": strategy.place(state), "losses": []}

    def step():
        box["state"], m = strategy.step(box["state"], batch)
        jax.block_until_ready((box["state"], m))
        box["losses"].append(float(m["loss"]))

    t0 = time.perf_counter()
    step()  # compiles
    return step, {"compile_s": time.perf_counter() - t0, "losses": box["losses"]}


def setup_torch(spec: dict):
    """(step, info) for transformers' GPT2LMHeadModel + torch AdamW, or None without torch."""
    try:
        import torch
        import torch.nn.functional as F
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    from jaxgpt.config import Config

    ref = Config()  # the same optimizer knobs as our side
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    hf_cfg = GPT2Config(vocab_size=spec["vocab_size"], n_positions=spec["block_size"],
                        n_embd=spec["n_embd"], n_layer=spec["n_layer"], n_head=spec["n_head"],
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None)  # unused; 50256 is outside (a)/(b)'s vocab
    model = GPT2LMHeadModel(hf_cfg).float().train()
    params = list(model.parameters())  # tied wte/lm_head appears once
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": ref.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=ref.lr, betas=(ref.beta1, ref.beta2))
    toks = torch.from_numpy(_tokens(spec)).long()
    x, y = toks[:, :-1].contiguous(), toks[:, 1:].contiguous()
    losses = []

    def step():
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, ref.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    step()
    return step, {"losses": losses, "attn_implementation": getattr(model.config, "_attn_implementation", None)}


def run_config(name: str, n_steps: int, n_warmup: int, rounds: int, with_torch: bool,
               parallel: tuple = ("pmap",)) -> dict:
    """Times every side in alternating rounds, so background load on a shared machine hits them
    alike; each side's figure is the median over all its timed steps. The first of `parallel`
    is "ours"; a second (mesh) gets its own figures and mesh_vs_pmap, its tokens/s over pmap's."""
    spec = CONFIGS[name]
    tokens_per_step = spec["batch_size"] * spec["block_size"]
    sides = {"ours": setup_jax(spec, parallel[0])}
    for other in parallel[1:]:
        sides[other] = setup_jax(spec, other)
    if with_torch:
        t = setup_torch(spec)
        if t is not None:
            sides["torch"] = t
    for step, _ in sides.values():
        _timed(step, n_warmup)
    times = {k: [] for k in sides}
    rounds = max(1, min(rounds, n_steps))
    for r in range(rounds):
        n = n_steps * (r + 1) // rounds - n_steps * r // rounds
        for k, (step, _) in sides.items():
            times[k] += _timed(step, n)

    def figures(prefix, ts):
        ms = 1e3 * statistics.median(ts)
        return {f"{prefix}ms_per_step": round(ms, 2), f"{prefix}tokens_per_s": round(tokens_per_step / ms * 1e3, 1),
                f"{prefix}ms_min": round(1e3 * min(ts), 2)}

    info = sides["ours"][1]
    flags = sys.modules.get("jaxgpt._cpu_tuning")
    row = {"config": name, **spec, "steps": n_steps, **figures("", times["ours"]),
           "malloc_tuned": bool(flags and flags.applied.get("malloc")),
           "compile_s": round(info["compile_s"], 2),
           "loss_first": round(info["losses"][0], 4), "loss_last": round(info["losses"][-1], 4)}
    row["parallel"] = parallel[0]
    for other in parallel[1:]:
        row.update(figures(f"{other}_", times[other]))
        row[f"{other}_loss_first"] = round(sides[other][1]["losses"][0], 4)
        row[f"{other}_vs_{parallel[0]}"] = round(row[f"{other}_tokens_per_s"] / row["tokens_per_s"], 3)
    if "torch" in sides:
        tinfo = sides["torch"][1]
        row.update(figures("torch_", times["torch"]))
        row.update({"torch_loss_first": round(tinfo["losses"][0], 4),
                    "torch_attn": tinfo["attn_implementation"],
                    "ratio": round(row["tokens_per_s"] / row["torch_tokens_per_s"], 3)})
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per side (default: a=50, b=12, c=6)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the compiling one")
    ap.add_argument("--rounds", type=int, default=4,
                    help="alternate ours/torch in this many rounds (shares background load fairly)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    ap.add_argument("--parallel", nargs="+", choices=["pmap", "mesh"], default=["pmap"],
                    help="our step under parallel=pmap and/or parallel=mesh mesh.data=-1 (one device); "
                         "both: timed side by side, the second reported as <name>_vs_<first>")
    args = ap.parse_args(argv)
    if len(set(args.parallel)) != len(args.parallel):
        print("error: --parallel lists a strategy twice", file=sys.stderr)
        return 2
    if (args.steps is not None and args.steps < 1) or args.warmup < 0 or args.rounds < 1:
        print("error: --steps and --rounds must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    for name in args.config:
        row = run_config(name, args.steps or DEFAULT_STEPS[name], args.warmup, args.rounds,
                         not args.no_torch, tuple(args.parallel))
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
