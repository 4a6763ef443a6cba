"""The training loop: data, init/resume, the pmapped step, eval, logging, checkpoints.

Multi-host: call `jax.distributed.initialize()` before `run_training` on every host. `pmap` then
spans all devices of all hosts, the step's `psum`s reduce across hosts, and each host feeds only
its own slice of the global batch (rows are split by `jax.process_index()`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxgpt import checkpoint as ckpt
from jaxgpt.config import Config, ModelConfig
from jaxgpt.data import Batcher, Dataset, check_labels, check_task
from jaxgpt.errors import UserError
from jaxgpt.metrics import MetricsLogger, peak_flops
from jaxgpt.model import count_params, create_model
from jaxgpt.train import (AXIS, build_optimizer, eval_step, flops_per_token, init_train_state,
                          lr_schedule, replace_model, shard_batch, train_step)
from jaxgpt.train import faults

DEFAULT_DATA = Config().data


def ensure_data(cfg: Config) -> dict:
    """meta.json of cfg.data; the embedded default corpus is prepared on first use."""
    from jaxgpt.prepare import load_meta, prepare

    if cfg.data == DEFAULT_DATA and not os.path.exists(os.path.join(cfg.data, "meta.json")):
        print(f"preparing the embedded default corpus (Python stdlib source) into {cfg.data} ...")
        prepare("stdlib", cfg.data, tokenizer="byte")
    return load_meta(cfg.data)


def _flatten_opt(opt_state):
    leaves = jax.tree.leaves(opt_state)
    return {f"{i:04d}": x for i, x in enumerate(leaves)}


def _unflatten_opt(template, flat):
    return jax.tree.unflatten(jax.tree.structure(template), [flat[k] for k in sorted(flat)])


def _init_params(cfg: Config, meta: dict):
    """(params, cfg) for a fresh run: from scratch, another checkpoint, or GPT-2."""
    if cfg.init_from == "scratch":
        return ckpt.model_params(build_model(cfg, cfg.seed)), cfg
    if cfg.init_from.startswith("gpt2") and not os.path.isdir(cfg.init_from):
        from jaxgpt.hf import load_pretrained
        src_model, src_cfg = load_pretrained(cfg.init_from)
        src_tok = "gpt2"
    else:
        src_model, src_cfg, src_meta = ckpt.load_model(cfg.init_from)
        src_tok = src_meta.get("tokenizer")
    if src_tok != meta.get("tokenizer"):
        raise UserError(f"init_from={cfg.init_from} uses tokenizer {src_tok!r} but the data in "
                        f"{cfg.data} was prepared with {meta.get('tokenizer')!r}; re-run prepare "
                        f"with --tokenizer {src_tok}")
    if src_cfg.model.vocab_size != cfg.model.vocab_size:
        raise UserError(f"init_from vocab_size {src_cfg.model.vocab_size} != data vocab_size "
                        f"{cfg.model.vocab_size}")
    # The architecture comes from the source checkpoint; dropout, block_size (only smaller:
    # the position table is cropped) and the classification head come from this run.
    src = src_cfg.model
    if cfg.model.block_size > src.block_size:
        raise UserError(f"model.block_size={cfg.model.block_size} exceeds init_from's block_size "
                        f"{src.block_size}")
    cfg = replace_model(cfg, n_layer=src.n_layer, n_head=src.n_head, n_embd=src.n_embd,
                        bias=src.bias)
    params = ckpt.model_params(build_model(cfg, cfg.seed))  # fresh head, if any
    src_params = ckpt.model_params(src_model)
    for k, v in src_params.items():
        if not k.startswith("cls_"):
            params[k] = v
    params["wpe"] = src_params["wpe"][: cfg.model.block_size]
    return params, cfg


def run_training(cfg: Config, quiet: bool = False) -> dict:
    """Train as configured; returns the last metrics. Raises UserError on bad input,
    faults.NonFiniteStop (a UserError) when nan_policy stops the run, and faults.Interrupted (a
    KeyboardInterrupt) after the checkpoint saved on SIGTERM or Ctrl-C."""
    # FAULTS: the run lock, the SIGTERM/SIGINT handlers and the NaN policy span the run.
    with faults.RunGuard(cfg, primary=jax.process_index() == 0) as guard:
        return _run_training(cfg, quiet, guard)


def _run_training(cfg: Config, quiet: bool, guard: faults.RunGuard) -> dict:
    devices = jax.local_devices()
    n_local, n_global = len(devices), jax.device_count()
    # A config that cannot work fails before anything is read or prepared (preparing the default
    # corpus takes minutes). With init_from the model comes from that checkpoint: checked later.
    early = cfg if cfg.init_from == "scratch" else dataclasses.replace(cfg, model=ModelConfig())
    early.validate(n_global)
    meta = ensure_data(cfg)
    kind = meta.get("kind", "stream")
    check_task(cfg.task, kind)
    if cfg.task == "classify":
        check_labels(Dataset(cfg.data, "train", meta), Dataset(cfg.data, "val", meta))
    n_classes = len(meta.get("labels") or []) if cfg.task == "classify" else 0
    cfg = replace_model(cfg, vocab_size=int(meta["vocab_size"]), n_classes=n_classes)
    cfg.validate(n_global)  # fail fast, before anything is built (again below for init_from)

    # ---- resume, or start fresh
    # FAULTS: from the newest intact checkpoint; damaged ones are reported and moved aside.
    resume = None
    if ckpt.has_steps(cfg.out):
        if cfg.resume == "never":
            raise UserError(f"{cfg.out} already holds checkpoints; use resume=auto to continue "
                            "them or a new out= folder (nothing was deleted)")
        resume = ckpt.Resume(cfg.out)
    if resume is not None:
        stored = resume.meta
        stored_cfg = Config.from_dict(stored["config"])
        if stored.get("tokenizer") != meta.get("tokenizer"):
            raise UserError(f"{cfg.out} was trained with tokenizer {stored.get('tokenizer')!r}, the "
                            f"data uses {meta.get('tokenizer')!r}")
        if cfg.init_from != "scratch":
            cfg = dataclasses.replace(cfg, model=stored_cfg.model)
        elif stored_cfg.model != cfg.model:
            raise UserError(f"{cfg.out} holds a run with a different model ({stored_cfg.model}); "
                            "use a new out= folder")
        params = ckpt.model_params(build_model(cfg, 0))
    else:
        params, cfg = _init_params(cfg, meta)
    cfg.validate(n_global)
    tokenizer_name = meta.get("tokenizer")

    tx = build_optimizer(cfg)
    state = init_train_state(params, tx, cfg.seed)
    if resume is not None:
        train_target = {"opt_state": _flatten_opt(state["opt_state"]), "step": np.zeros((), np.int32),
                        "rng": np.zeros(state["rng"].shape, np.uint32)}
        _, params, train, _ = resume.restore(state["params"], train_target)
        state = {"params": params, "opt_state": _unflatten_opt(state["opt_state"], train["opt_state"]),
                 "step": jnp.asarray(train["step"], jnp.int32), "rng": jnp.asarray(train["rng"])}
        if not quiet:
            print(f"resuming from {cfg.out} step {int(train['step'])}")
    start_step = int(state["step"])

    graphdef = nnx.graphdef(create_model_abstract(cfg))
    train_ds, val_ds = Dataset(cfg.data, "train", meta), Dataset(cfg.data, "val", meta)
    micro = cfg.batch_size // (n_global * cfg.grad_accum)
    host_rows = cfg.batch_size // jax.process_count()
    tr = Batcher(train_ds, cfg.task, cfg.batch_size, cfg.model.block_size, cfg.seed)
    eval_bs = micro * n_global
    ev = {"train": Batcher(train_ds, cfg.task, eval_bs, cfg.model.block_size, cfg.seed),
          "val": Batcher(val_ds, cfg.task, eval_bs, cfg.model.block_size, cfg.seed)}
    if not quiet and cfg.task == "sft" and (tr.truncated or tr.dropped):
        print(f"sft: {tr.truncated} train examples truncated from the left of the prompt, "
              f"{tr.dropped} dropped (completion longer than block_size={cfg.model.block_size})")

    def host_slice(b):  # this host's rows of a global batch
        lo = jax.process_index() * (b.shape[0] // jax.process_count())
        return b[lo:lo + b.shape[0] // jax.process_count()]

    p_step, p_eval = compiled_steps(graphdef, _step_key(cfg))

    def run_eval(params_rep) -> dict:
        out = {}
        for split, b in ev.items():
            tot = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}
            for i in range(b.eval_passes(cfg.eval_steps)):
                batch = jax.tree.map(host_slice, b.batch(i, train=False))
                r = p_eval(params_rep, jax.tree.map(lambda x: x.reshape(n_local, -1, *x.shape[1:]), batch))
                for k in tot:
                    if k in r:
                        tot[k] += float(r[k][0])
            out[f"{split}_loss"] = tot["loss_sum"] / max(tot["count"], 1.0)
            if cfg.task == "classify":
                out[f"{split}_acc"] = tot["correct"] / max(tot["count"], 1.0)
        return out

    os.makedirs(cfg.out, exist_ok=True)
    logger = MetricsLogger(cfg.out, start_step, cfg.to_dict(), cfg.tensorboard, cfg.wandb)
    writer = ckpt.CheckpointWriter(cfg.out, cfg.keep, blocking=not cfg.async_save)
    base_meta = {"tokenizer": tokenizer_name, "data_meta": meta, "config": cfg.to_dict()}
    n_params = count_params(create_model_abstract(cfg))
    flops_tok = flops_per_token(cfg, n_params)
    peak = peak_flops(cfg.dtype) * (1 if devices[0].platform == "cpu" else n_local)
    tokens_per_step = cfg.batch_size * cfg.model.block_size
    sched = lr_schedule(cfg)
    select = "val_acc" if cfg.task == "classify" else "val_loss"
    sign = -1.0 if select == "val_acc" else 1.0
    best, since_best, last_eval = math.inf, 0, {}
    for r in logger.rows:  # resumed runs continue the best/patience bookkeeping
        if r.get(select) is not None:
            v = sign * r[select]
            best, since_best = (v, 0) if v < best else (best, since_best + 1)

    # pmap takes a leading device axis. Place the state exactly as pmap returns it, so the
    # second step does not recompile for a different input placement.
    rep = NamedSharding(Mesh(np.array(devices), (AXIS,)), PartitionSpec(AXIS))
    state = jax.device_put(
        jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n_local, *np.shape(x))), state), rep)
    step = start_step

    def save(step_, metrics=None):
        nonlocal pending
        if pending is not None:  # FAULTS: a saved step's metrics row is on disk before it
            logger.log(_report(pending, bar, sched, peak, flops_tok, tokens_per_step))
            pending = None
        host = jax.tree.map(lambda x: x[0], state)
        writer.save(step_, host["params"],
                    {"opt_state": _flatten_opt(host["opt_state"]), "step": host["step"], "rng": host["rng"]},
                    dict(base_meta, metrics=metrics or {}))

    if not quiet:
        print(f"model: {n_params / 1e6:.2f}M params | devices: {n_global} x {devices[0].platform} | "
              f"batch {cfg.batch_size} x {cfg.model.block_size} tokens | steps {start_step}->{cfg.max_steps}")
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=quiet, dynamic_ncols=True, unit="step")
    t_last, steps_timed, stop_reason, interrupted = None, 0, None, False
    pending = None  # metrics of the step in flight: read after the next step is dispatched
    prev_metrics = None
    try:
        while step < cfg.max_steps:
            if guard.stop_requested:  # FAULTS: SIGTERM/Ctrl-C stop at a step boundary
                interrupted = True
                break
            batch = guard.batch(step, jax.tree.map(host_slice, tr.batch(step)))  # FAULTS: test faults
            state, metrics = p_step(state, shard_batch(batch, n_local, cfg.grad_accum))
            # At most two steps in flight. An unbounded queue (a long log_interval never syncs)
            # deadlocks XLA:CPU's in-process all-reduce on simulated devices, and holds a
            # batch per queued step in memory on any backend.
            if prev_metrics is not None:
                jax.block_until_ready(prev_metrics)
                guard.observe(step, prev_metrics, logger)  # FAULTS: nan_policy, one step late
            prev_metrics = metrics
            step += 1
            bar.update(1)
            if pending is not None:  # the previous log step, read after this step was dispatched
                logger.log(_report(pending, bar, sched, peak, flops_tok, tokens_per_step))
                pending = None
            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                now = time.perf_counter()
                tps = None
                if t_last is not None and steps_timed:
                    tps = tokens_per_step * steps_timed / (now - t_last)
                t_last, steps_timed = now, 0
                pending = {"step": step, "m": metrics, "tps": tps}
            steps_timed += 1
            evaluated = step % cfg.eval_interval == 0 or step == cfg.max_steps
            if evaluated or step % cfg.save_interval == 0:
                guard.observe(step, metrics, logger)  # FAULTS: no eval or save of a bad step
            if evaluated:
                last_eval = run_eval(state["params"])
                row = _report(pending, bar, sched, peak, flops_tok, tokens_per_step) if pending else {"step": step}
                pending = None
                # the per-step train_loss stays; the eval's train-split loss gets its own key
                logger.log({**row, **{("eval_train_" + k[6:] if k.startswith("train_") else k): v
                                      for k, v in last_eval.items()}})
                logger.plot()
                bar.write(" | ".join([f"step {step}"] + [f"{k} {v:.4f}" for k, v in last_eval.items()]))
                v = sign * last_eval[select]
                if v < best:
                    best, since_best = v, 0
                    save(step, last_eval)  # the best checkpoint is always kept
                else:
                    since_best += 1
                t_last = None  # eval time is not training throughput
                if cfg.early_stop_patience and since_best >= cfg.early_stop_patience:
                    stop_reason = (f"early stopping at step {step}: {select} has not improved for "
                                   f"{since_best} evals (best {sign * best:.4f})")
                    break
            if step % cfg.save_interval == 0:
                save(step, last_eval if evaluated else None)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if pending is not None:
            logger.log(_report(pending, bar, sched, peak, flops_tok, tokens_per_step))
            pending = None  # FAULTS: save() below would log it again
        bar.close()
        try:
            if guard.may_save and prev_metrics is not None:  # FAULTS: the last step, before its save
                guard.observe(step, prev_metrics, logger)
            if guard.may_save:  # FAULTS: nothing is saved after nan_policy stopped the run
                save(step, last_eval if last_eval and step % cfg.eval_interval == 0 else None)
        finally:
            writer.close()
            logger.close()
    if stop_reason and not quiet:
        print(stop_reason)
    if not quiet and not interrupted and cfg.task == "lm":
        _print_sample(graphdef, jax.tree.map(lambda x: x[0], state["params"]), tokenizer_name)
    if interrupted:
        stop = guard.interrupted(step)  # FAULTS: exit code 75 (SIGTERM) or 130 (Ctrl-C)
        print(f"interrupted at step {step}; " + (f"checkpoint saved in {cfg.out}" if stop.saved else
              "nothing saved") + " (resume=auto continues from the latest checkpoint)")
        raise stop
    return {"step": step, **last_eval, "stopped_early": bool(stop_reason)}


def _report(p, bar, sched, peak, flops_tok, tokens_per_step) -> dict:
    """The metrics row of a log step (and the progress bar's postfix)."""
    m, step = jax.device_get(jax.tree.map(lambda x: x[0], p["m"])), p["step"]
    row = {"step": step, "train_loss": float(m["loss"]), "lr": float(sched(step - 1)),
           "grad_norm": float(m["grad_norm"])}
    if "acc" in m:
        row["train_acc"] = float(m["acc"])
    if p["tps"]:
        row["tokens_per_s"] = p["tps"]
        row["mfu"] = p["tps"] * flops_tok / peak
    post = {"loss": f"{row['train_loss']:.4f}", "lr": f"{row['lr']:.2e}"}
    if p["tps"]:
        post["tok/s"] = f"{p['tps']:.0f}"
        post["mfu"] = f"{100 * row['mfu']:.1f}%"
    bar.set_postfix(post)
    return row


def _print_sample(graphdef, params, tokenizer_name, n_tokens: int = 256) -> None:
    """A sample from <|endoftext|> at the end of a run: the quickest check of what was learned."""
    from jaxgpt.generation import generate
    from jaxgpt.tokenizer import get_tokenizer

    if tokenizer_name is None:
        return
    tok = get_tokenizer(tokenizer_name)
    model = nnx.merge(graphdef, params)
    out = generate(model, [[tok.eot_id]], n_tokens, temperature=0.8, top_k=40, seed=0)[0]
    print("---- sample (temperature 0.8, top-k 40) ----")
    print(tok.decode(out))
    print("--------------------------------------------")


def _step_key(cfg: Config) -> Config:
    """The part of the config the compiled step depends on (the rest is host-side bookkeeping)."""
    return dataclasses.replace(
        cfg, data="", out="", init_from="", max_steps=cfg.total_decay_steps, decay_steps=0,
        log_interval=1, eval_interval=1, eval_steps=1, save_interval=1, async_save=False, keep=1,
        resume="auto",
        tensorboard=False, wandb=False, early_stop_patience=0,
        nan_policy="stop", nan_max_skips=1)  # FAULTS: host-side, like the rest


@functools.lru_cache(maxsize=8)
def compiled_steps(graphdef, cfg: Config):
    """pmapped (train_step, eval_step), cached so runs in one process share compilations."""
    tx = build_optimizer(cfg)
    p_step = jax.pmap(partial(train_step, graphdef=graphdef, tx=tx, task=cfg.task),
                      axis_name=AXIS, donate_argnums=(0,))
    p_eval = jax.pmap(partial(eval_step, graphdef=graphdef, task=cfg.task), axis_name=AXIS)
    return p_step, p_eval


def build_model(cfg: Config, seed: int):
    """The run's model: its compute dtype, attention backend and remat policy resolved here."""
    try:
        return create_model(cfg.model, seed, cfg.dtype, cfg.attention, cfg.remat)
    except ValueError as e:  # an explicit backend that cannot serve this model or platform
        raise UserError(str(e)) from None


def create_model_abstract(cfg: Config):
    return nnx.eval_shape(lambda: build_model(cfg, 0))
