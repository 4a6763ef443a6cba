"""Where a run starts: resumed from `out`, initialised from another model, or fresh.

`plan(cfg, meta)` decides (before the model is built, since a resumed or init_from run takes
its architecture from a checkpoint) and `initial_state(plan, strategy)` builds the state in the
strategy's layout:
- resume: Orbax restores every leaf straight into the strategy's target shardings (each
  process reads only its own shards; FSDP never assembles a whole model anywhere);
- scratch: the state is computed where it lives (the strategy's `init`);
- init_from (a checkpoint or GPT-2): the source params on the host, then placed.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from flax import nnx

from jaxgpt import checkpoint as ckpt
from jaxgpt.config import Config
from jaxgpt.errors import UserError
from jaxgpt.model import create_model
from jaxgpt.train.step import init_train_state, replace_model


@dataclasses.dataclass
class Plan:
    cfg: Config  # final: the model from the resumed checkpoint or from init_from
    resume: "ckpt.Resume | None"
    host_params: dict | None = None  # init_from's params (None: resume or scratch)


def build_model(cfg: Config, seed: int):
    """The run's model: its compute dtype, attention backend and remat policy resolved here."""
    try:
        return create_model(cfg.model, seed, cfg.dtype, cfg.attention, cfg.remat)
    except ValueError as e:  # an explicit backend that cannot serve this model or platform
        raise UserError(str(e)) from None


def abstract_model(cfg: Config):
    return nnx.eval_shape(lambda: build_model(cfg, 0))


def plan(cfg: Config, meta: dict) -> Plan:
    """Resume (the newest intact checkpoint of out), init_from, or scratch; the config checks
    that need the stored or source model."""
    resume = None
    # FAULTS: from the newest intact checkpoint; damaged ones are reported and moved aside.
    if ckpt.has_steps(cfg.out):
        if cfg.resume == "never":
            raise UserError(f"{cfg.out} already holds checkpoints; use resume=auto to continue "
                            "them or a new out= folder (nothing was deleted)")
        resume = ckpt.Resume(cfg.out)
    if resume is None:
        if cfg.init_from == "scratch":
            return Plan(cfg, None)
        params, cfg = _init_from(cfg, meta)
        return Plan(cfg, None, params)
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
    return Plan(cfg, resume)


def initial_state(p: Plan, strategy, quiet: bool) -> tuple[dict, int]:
    """(state in the strategy's layout, the step it is at)."""
    cfg = p.cfg
    if p.resume is not None:
        state = _restore(p.resume, strategy)
        step = int(strategy.host({"s": state["step"]})["s"])
        if not quiet:
            print(f"resuming from {cfg.out} step {step}")
        return strategy.place(state), step
    if p.host_params is not None:
        return strategy.place(init_train_state(p.host_params, strategy.tx, cfg.seed)), 0
    return strategy.init(lambda: ckpt.model_params(build_model(cfg, cfg.seed))), 0


def _restore(resume, strategy) -> dict:
    target = strategy.restore_target(strategy.abstract_state())
    train_target = {"opt_state": flatten_opt(target["opt_state"]), "step": target["step"],
                    "rng": target["rng"]}
    _, params, train, _ = resume.restore(target["params"], train_target)
    return {"params": params, "opt_state": unflatten_opt(target["opt_state"], train["opt_state"]),
            "step": train["step"], "rng": train["rng"]}


def flatten_opt(opt_state) -> dict:
    """The optimizer state as the checkpoint's `train` item stores it: leaves by position."""
    return {f"{i:04d}": x for i, x in enumerate(jax.tree.leaves(opt_state))}


def unflatten_opt(template, flat: dict):
    return jax.tree.unflatten(jax.tree.structure(template), [flat[k] for k in sorted(flat)])


def _init_from(cfg: Config, meta: dict):
    """(params on the host, cfg) from another checkpoint or GPT-2: the architecture comes from
    the source; dropout, block_size (only smaller: positions are cropped) and the
    classification head from this run."""
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
    return jax.device_get(params), cfg
