"""Evaluate a checkpoint from the checkpoint folder alone: loss, perplexity, accuracy."""

from __future__ import annotations

import math
import os
from functools import partial

import jax
import numpy as np
from flax import nnx

from jaxgpt.checkpoint import load_model, model_params
from jaxgpt.data import Batcher, Dataset, check_task
from jaxgpt.errors import UserError
from jaxgpt.train import eval_step


def evaluate_checkpoint(ckpt_dir: str, data: str | None = None, step: int | None = None,
                        steps: int | None = None, dtype: str | None = None,
                        quantize: str | None = None) -> dict:
    """Train/val loss (and accuracy for classifiers) of a checkpoint; dtype overrides the run's
    compute dtype (params stay float32); quantize="int8" evaluates the int8 weight-only model
    (jaxgpt/quant.py)."""
    from jaxgpt.prepare import load_meta
    from jaxgpt.quant import check_mode, quantize_model

    check_mode(quantize)
    model, cfg, meta = load_model(ckpt_dir, step, dtype=dtype)
    model = quantize_model(model, quantize)
    data = data or cfg.data
    if not os.path.isdir(data):
        raise UserError(f"data folder not found: {data} (pass --data)")
    dmeta = load_meta(data)
    if dmeta.get("tokenizer") != meta.get("tokenizer"):
        raise UserError(f"checkpoint tokenizer {meta.get('tokenizer')!r} does not match the data's "
                        f"{dmeta.get('tokenizer')!r} ({data})")
    check_task(cfg.task, dmeta.get("kind", "stream"))
    if cfg.task == "classify" and dmeta.get("labels") != meta.get("data_meta", {}).get("labels"):
        raise UserError(f"the labels of {data} differ from the checkpoint's")
    graphdef, params = nnx.graphdef(model), model_params(model)
    f = jax.jit(partial(eval_step, graphdef=graphdef, task=cfg.task, axis_name=None))
    bs = max(1, cfg.batch_size // cfg.grad_accum)
    n = steps or cfg.eval_steps
    out = {"step": int(meta.get("step", 0))}
    if quantize:
        out["quantize"] = quantize
    for split in ("train", "val"):
        b = Batcher(Dataset(data, split, dmeta), cfg.task, bs, cfg.model.block_size, cfg.seed)
        loss_sum = count = correct = 0.0
        conf = np.zeros((cfg.model.n_classes,) * 2, np.int64)
        for i in range(b.eval_passes(n)):
            batch = b.batch(i, train=False)
            r = jax.device_get(f(params, batch))
            loss_sum, count = loss_sum + float(r["loss_sum"]), count + float(r["count"])
            if cfg.task == "classify":
                correct += float(r["correct"])
                for t, p, w in zip(batch["labels"], r["pred"], batch["weight"]):
                    if w > 0:
                        conf[t, p] += 1
        out[f"{split}_loss"] = loss_sum / max(count, 1.0)
        if cfg.task == "classify":
            out[f"{split}_acc"] = correct / max(count, 1.0)
            if split == "val":
                out["confusion"] = conf.tolist()
                out["labels"] = list(dmeta["labels"])
    out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
    return out
