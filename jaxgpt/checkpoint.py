"""Orbax checkpoints that carry everything `eval` and `generate` need.

Layout of a run folder (`out/`):
    out/<step>/params     model parameters (float32), an Orbax PyTree item
    out/<step>/train      optimizer state, step and RNG key: only `resume` reads it
    out/<step>/meta       JSON: format tag, resolved config, tokenizer, data meta, metrics, version
    out/metrics.jsonl, out/loss.png  (written by the training loop, ignored here)

Params and training state are separate items so `eval`/`generate` restore the params alone,
through an abstract target built from the stored config (`nnx.eval_shape`), never guessing a
structure and never allocating twice. Orbax writes each step into a temporary folder and renames
it when complete, so a crash during a save leaves the previous checkpoints readable.

Retention: the newest `keep` checkpoints plus the best one by the validation metric (val loss,
or val accuracy for classification). Loading without `step` takes that best checkpoint — for a
plain pretraining run the best is almost always the latest — and `resume` takes the latest.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxgpt.config import Config
from jaxgpt.errors import UserError

FORMAT = "jaxgpt-ckpt-1"
_ITEMS = ("params", "train", "meta")


def _version() -> str:
    from jaxgpt import __version__
    return __version__


def _to_numpy(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def model_params(model) -> dict:
    """The model's parameters as a plain nested dict of arrays (what the `params` item holds)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def metric_of(meta: dict) -> tuple[str, float] | None:
    """(name, value to minimise) of a checkpoint's selection metric, if it was evaluated."""
    m = meta.get("metrics") or {}
    if meta.get("config", {}).get("task") == "classify" and m.get("val_acc") is not None:
        return "val_acc", -float(m["val_acc"])
    if m.get("val_loss") is not None:
        return "val_loss", float(m["val_loss"])
    return None


class CheckpointWriter:
    """Saves (asynchronously) into a run folder and applies the newest-`keep` + best retention."""

    def __init__(self, directory: str, keep: int):
        self.directory = os.path.abspath(directory)
        self.keep = keep
        options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                               enable_async_checkpointing=True)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, params, train_state, meta: dict) -> None:
        self._mngr.wait_until_finished()  # one save in flight at a time; retention sees final steps
        if step in self._mngr.all_steps():  # e.g. Ctrl-C right after a periodic save
            return
        meta = dict(meta, format=FORMAT, step=int(step), jaxgpt_version=_version())
        self._mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(_to_numpy(params)),
            train=ocp.args.StandardSave(_to_numpy(train_state)),
            meta=ocp.args.JsonSave(meta)))
        self._retain(pending=(step, meta))

    def _retain(self, pending) -> None:
        steps = sorted(set(self._mngr.all_steps()) | {pending[0]})
        keep = set(steps[-self.keep:])
        scored = []
        for s in steps:
            m = pending[1] if s == pending[0] else _read_meta(self._mngr, s)
            score = metric_of(m) if m else None
            if score is not None:
                scored.append((score[1], s))
        if scored:
            keep.add(min(scored)[1])
        for s in steps:
            if s not in keep and s != pending[0]:
                self._mngr.delete(s)

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def _read_meta(mngr, step) -> dict | None:
    try:
        return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception:
        return None


def _open(ckpt_dir: str) -> ocp.CheckpointManager:
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"checkpoint folder not found: {ckpt_dir}")
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    mngr = ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=options, item_names=_ITEMS)
    if not mngr.all_steps():
        mngr.close()
        raise UserError(f"no jaxgpt checkpoint in {ckpt_dir} (expected numbered step folders "
                        "written by `jaxgpt train` or `jaxgpt convert`)")
    return mngr


def list_steps(ckpt_dir: str) -> list[int]:
    mngr = _open(ckpt_dir)
    try:
        return sorted(mngr.all_steps())
    finally:
        mngr.close()


def read_meta(ckpt_dir: str, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of the chosen checkpoint: `step`, else the best by val metric, else latest."""
    mngr = _open(ckpt_dir)
    try:
        return _choose(mngr, ckpt_dir, step, best=True)
    finally:
        mngr.close()


def _choose(mngr, ckpt_dir, step, best: bool) -> tuple[int, dict]:
    steps = sorted(mngr.all_steps())
    if step is not None:
        if step not in steps:
            raise UserError(f"no checkpoint at step {step} in {ckpt_dir}; available steps: {steps}")
        chosen = step
    else:
        chosen = steps[-1]
        if best:
            scored = [(metric_of(m)[1], s) for s in steps
                      if (m := _read_meta(mngr, s)) and metric_of(m) is not None]
            if scored:
                chosen = min(scored)[1]
    meta = _read_meta(mngr, chosen)
    if not meta or meta.get("format") != FORMAT:
        raise UserError(f"{ckpt_dir} step {chosen} is not a jaxgpt checkpoint (foreign or corrupt metadata)")
    return chosen, meta


def load_model(ckpt_dir: str, step: int | None = None, dtype=None, attention: str = "auto"):
    """Restore params only, with the config stored in the checkpoint: (model, Config, meta).

    dtype: the compute dtype to serve in (default: the run's `dtype`, whose "auto" means
    bfloat16 on GPU/TPU, float32 on CPU); params stay float32 whatever it is. attention: the
    backend (default auto: the best for this platform, whatever the run trained with).
    """
    from jaxgpt.model import abstract_model

    mngr = _open(ckpt_dir)
    try:
        chosen, meta = _choose(mngr, ckpt_dir, step, best=True)
        cfg = Config.from_dict(meta["config"])
        try:
            model = abstract_model(cfg.model, dtype or cfg.dtype, attention)
        except (ValueError, TypeError) as e:
            raise UserError(f"cannot serve {ckpt_dir} that way: {e}") from None
        target = _abstract(model_params(model))
        try:
            params = mngr.restore(chosen, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target))).params
        except Exception as e:
            raise UserError(f"could not restore params from {ckpt_dir} step {chosen}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    finally:
        mngr.close()
    nnx.replace_by_pure_dict(state := nnx.state(model, nnx.Param), jax.tree.map(jax.numpy.asarray, params))
    nnx.update(model, state)
    return model, cfg, meta


def restore_train_state(ckpt_dir: str, params_target, train_target, step: int | None = None):
    """Latest (or `step`) params + optimizer/step/RNG for resume: (step, params, train, meta)."""
    mngr = _open(ckpt_dir)
    try:
        chosen, meta = _choose(mngr, ckpt_dir, step, best=False)
        r = mngr.restore(chosen, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(params_target)),
            train=ocp.args.StandardRestore(_abstract(train_target))))
    finally:
        mngr.close()
    return chosen, r.params, r.train, meta


def save_model_checkpoint(ckpt_dir: str, model, config: Config, meta: dict | None = None,
                          step: int = 0) -> None:
    """Write a params-only checkpoint (conversion, tests). `meta` must name the tokenizer."""
    meta = dict(meta or {})
    meta.setdefault("tokenizer", "gpt2")
    meta["config"] = config.to_dict()
    writer = CheckpointWriter(ckpt_dir, keep=1_000_000)
    try:
        writer.save(step, model_params(model), {"step": np.int64(step)}, meta)
    finally:
        writer.close()
