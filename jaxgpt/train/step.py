"""Optimizer and the pure train/eval step functions (pmapped over all local devices).

The step body is written per device with named-axis collectives (`lax.psum(..., "data")`), so
the same code runs on 1 device, N devices, or several hosts after `jax.distributed.initialize()`.

Exactness of the loss: a step's loss is sum(masked token losses) / sum(mask) over the *global*
batch. Each device accumulates the gradient of its loss *sum* over its micro-batches and the
token count, both are psum'ed, then divided once. So k micro-batches on N devices give the same
gradient as one batch on one device, whatever the padding in each shard.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxgpt import loss
from jaxgpt.config import Config

AXIS = "data"


# ---------------------------------------------------------------- optimizer
def lr_schedule(cfg: Config) -> optax.Schedule:
    # Linear warmup 0 -> lr, cosine to min_lr at decay_steps (counted from step 0, warmup
    # included, as in nanoGPT), then constant min_lr.
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.total_decay_steps, cfg.warmup_steps + 1), end_value=cfg.min_lr)


def decay_mask(params: dict) -> dict:
    """Weight decay on weight matrices and embeddings only: not biases, not LayerNorm."""
    def leaf(path, _):
        name = str(path[-1].key)
        return name.startswith("w") or name == "cls_w"
    return jax.tree_util.tree_map_with_path(leaf, params)


def param_groups(params: dict) -> dict:
    """'head' for the classification head, 'body' for everything else (fine-tuning groups)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "head" if str(path[0].key).startswith("cls_") else "body", params)


def build_optimizer(cfg: Config) -> optax.GradientTransformation:
    sched = lr_schedule(cfg)

    def adamw(scale: float):
        s = sched if scale == 1.0 else (lambda step: scale * sched(step))
        return optax.adamw(s, b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay,
                           mask=decay_mask)

    if cfg.task == "classify" and (cfg.freeze == "body" or cfg.body_lr_scale != 1.0):
        body = optax.set_to_zero() if cfg.freeze == "body" else adamw(cfg.body_lr_scale)
        opt = optax.multi_transform({"body": body, "head": adamw(1.0)}, param_groups)
    else:
        opt = adamw(1.0)
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    return opt


# ---------------------------------------------------------------- losses
def lm_loss_sums(graphdef, params, batch, dropout_key):
    """(sum of masked next-token losses, number of counted targets, {}) for one micro-batch."""
    return loss.lm_loss_sums(nnx.merge(graphdef, params), batch, dropout_key)


def classify_loss_sums(graphdef, params, batch, dropout_key):
    return loss.classify_loss_sums(nnx.merge(graphdef, params), batch, dropout_key)


def loss_fn_for(task: str):
    return classify_loss_sums if task == "classify" else lm_loss_sums


# ---------------------------------------------------------------- steps
def train_step(state: dict, batch: dict, *, graphdef, tx, task: str, axis_name: str | None = AXIS,
               row_blocks: tuple | None = None):
    """One optimizer step on this device's shard.

    state: {"params", "opt_state", "step" (), "rng" (key)} — replicated, donated by the caller.
    batch: this device's shard, every leaf shaped (grad_accum, micro_batch, ...).
    With axis_name=None the step runs without collectives (one device, tests, no pmap).
    row_blocks: (n, spmd_axes), for jit over a device mesh (axis_name=None, the batch global).
      Each micro-batch is n equal blocks of rows, block j being the rows pmap's device j would
      hold, and each block's loss is computed as on that device: its dropout key folds in j
      (pmap folds in the device index), and the chunked loss walks the block's own tokens. The
      blocks are vmapped with spmd_axis_name=spmd_axes, the mesh axes the batch is split over.
    """
    loss_sums = loss_fn_for(task)
    step_key = jax.random.fold_in(state["rng"], state["step"])
    if axis_name is not None:  # different dropout on every device
        step_key = jax.random.fold_in(step_key, jax.lax.axis_index(axis_name))

    def micro_loss(p, mb, i):
        if row_blocks is None:
            return loss_sums(graphdef, p, mb, jax.random.fold_in(step_key, i))
        return _blocked_loss(loss_sums, graphdef, p, mb, step_key, i, *row_blocks)

    def micro(carry, xs):
        grads_acc, loss_acc, n_acc, extra_acc = carry
        mb, i = xs
        def f(p):
            s, n, extra = micro_loss(p, mb, i)
            return s, (n, extra)
        (s, (n, extra)), g = jax.value_and_grad(f, has_aux=True)(state["params"])
        add = partial(jax.tree.map, jnp.add)
        return (add(grads_acc, g), loss_acc + s, n_acc + n, add(extra_acc, extra)), None

    n_micro = jax.tree.leaves(batch)[0].shape[0]
    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    extra0 = jax.tree.map(lambda _: jnp.zeros((), jnp.float32),
                          jax.eval_shape(lambda: loss_sums(graphdef, state["params"],
                                                           jax.tree.map(lambda x: x[0], batch), None)[2]))
    init = (zeros, jnp.zeros(()), jnp.zeros(()), extra0)
    if n_micro == 1:
        # No loop for a single micro-batch: XLA:CPU copies loop-carried params and grads into
        # and out of a while loop, even one with a single trip.
        (g_sum, loss_sum, count, extra), _ = micro(
            init, (jax.tree.map(lambda x: x[0], batch), jnp.zeros((), jnp.int32)))
    else:
        (g_sum, loss_sum, count, extra), _ = jax.lax.scan(micro, init, (batch, jnp.arange(n_micro)))
    if axis_name is not None and jax.lax.axis_size(axis_name) > 1:
        # (on one device the all-reduce would still copy every gradient)
        g_sum, loss_sum, count, extra = jax.lax.psum((g_sum, loss_sum, count, extra), axis_name)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, g_sum)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    loss_mean, grad_norm = loss_sum / count, optax.tree.norm(grads)
    # A non-finite loss or gradient never reaches the state: the update is skipped (params and
    # optimizer state unchanged; the loop's nan_policy decides whether to go on). The selects
    # fuse into the update's elementwise work, which reads both versions anyway.
    finite = jnp.isfinite(loss_mean) & jnp.isfinite(grad_norm)
    keep = partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    params, opt_state = keep(params, state["params"]), keep(opt_state, state["opt_state"])
    metrics = {"loss": loss_mean, "grad_norm": grad_norm, "finite": finite}
    if "correct" in extra:
        metrics["acc"] = extra["correct"] / count
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
    return new_state, metrics


def _blocked_loss(loss_sums, graphdef, params, mb, step_key, i, n: int, spmd_axes):
    """loss_sums of a global micro-batch as n row blocks, block j as pmap's device j computes
    it (see train_step's row_blocks): dropout key fold_in(fold_in(step_key, j), i)."""
    def one(block, j):
        return loss_sums(graphdef, params, block, jax.random.fold_in(jax.random.fold_in(step_key, j), i))
    if n == 1:  # no vmap over a single block (the one-device mesh runs pmap's exact program)
        return one(mb, 0)
    blocks = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), mb)
    s, c, extra = jax.vmap(one, spmd_axis_name=spmd_axes)(blocks, jnp.arange(n))
    return s.sum(), c.sum(), jax.tree.map(jnp.sum, extra)


def eval_step(params, batch: dict, *, graphdef, task: str, axis_name: str | None = AXIS):
    """(loss sum, count, extra sums) of one eval batch shard; no dropout, no gradients."""
    s, n, extra = loss_fn_for(task)(graphdef, params, batch, None)
    out = {"loss_sum": s, "count": n, **extra}
    if task == "classify":
        model = nnx.merge(graphdef, params)
        out["pred"] = jnp.argmax(model.classify(batch["tokens"], batch["lengths"]), -1)
    else:
        out = jax.lax.psum(out, axis_name) if axis_name is not None else out
        return out
    sums = {k: v for k, v in out.items() if k != "pred"}
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    return {**sums, "pred": out["pred"]}


def init_train_state(params: dict, tx, seed: int) -> dict:
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            # raw uint32 key data: checkpoints store it as a plain array
            "rng": jax.random.key_data(jax.random.key(seed))}


def shard_batch(batch: dict, n_devices: int, grad_accum: int) -> dict:
    """(B, ...) -> (devices, grad_accum, B / (devices * grad_accum), ...): device d gets rows
    [d*B/devices, (d+1)*B/devices), split into grad_accum consecutive micro-batches."""
    def f(x):
        return x.reshape(n_devices, grad_accum, x.shape[0] // (n_devices * grad_accum), *x.shape[1:])
    return jax.tree.map(f, batch)


def flops_per_token(cfg: Config, n_params: int) -> float:
    """nanoGPT/PaLM estimate of training FLOPs per token: 6N + 12 L T D (attention)."""
    m = cfg.model
    return 6.0 * n_params + 12.0 * m.n_layer * m.block_size * m.n_embd


def replace_model(cfg: Config, **kw) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **kw))
