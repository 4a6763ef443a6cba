"""The training loop: `run_training(cfg)` and the loop itself (`Trainer`).

A run, each part given the config once:
    distributed.initialize(cfg)    join the cluster when there is one (jaxgpt/train/distributed.py)
    faults.RunGuard(cfg)           run lock, signals, NaN policy (jaxgpt/train/faults.py)
    checked(cfg)                   validation and the data's meta, before anything is built
    start.plan(cfg, meta)          resume, init_from or scratch (jaxgpt/train/start.py)
    parallel.create(cfg, ...)      pmap or mesh, behind one interface (jaxgpt/train/parallel.py)
    Trainer(...).run()             steps, logging, eval and early stopping, checkpoints

Multi-host: one command per host (`distributed=auto` finds the cluster). Each process builds
only its rows of every global batch, logs and writes metrics only on process 0, and takes part
in every checkpoint save (Orbax writes each process's shards).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
from flax import nnx

from jaxgpt import checkpoint as ckpt
from jaxgpt.config import Config, ModelConfig
from jaxgpt.data import Batcher, Dataset, check_labels, check_task
from jaxgpt.metrics import MetricsLogger, mfu_peak
from jaxgpt.model import count_params
from jaxgpt.train import distributed, faults, parallel, start
from jaxgpt.train.evaluation import EarlyStopping, Evaluator
from jaxgpt.train.start import build_model  # noqa: F401  (the run's model; tests import it here)
from jaxgpt.train.step import flops_per_token, lr_schedule, replace_model

DEFAULT_DATA = Config().data


def run_training(cfg: Config, quiet: bool = False) -> dict:
    """Train as configured; returns the last metrics. Raises UserError on bad input,
    faults.NonFiniteStop (a UserError) when nan_policy stops the run, and faults.Interrupted (a
    KeyboardInterrupt) after the checkpoint saved on SIGTERM or Ctrl-C."""
    distributed.initialize(cfg)  # before anything asks JAX for its devices
    primary = jax.process_index() == 0
    # FAULTS: the run lock, the SIGTERM/SIGINT handlers and the NaN policy span the run.
    with faults.RunGuard(cfg, primary=primary) as guard:
        cfg, meta = checked(cfg)
        p = start.plan(cfg, meta)
        cfg = p.cfg
        strategy = parallel.create(cfg, nnx.graphdef(start.abstract_model(cfg)))
        cfg.validate(strategy.n_blocks)  # again: init_from and resume may change the model
        state, step = start.initial_state(p, strategy, quiet or not primary)
        return Trainer(cfg, meta, strategy, state, step, guard, quiet or not primary).run()


def ensure_data(cfg: Config) -> dict:
    """meta.json of cfg.data; the embedded default corpus is prepared on first use."""
    from jaxgpt.prepare import load_meta, prepare

    if cfg.data == DEFAULT_DATA and not os.path.exists(os.path.join(cfg.data, "meta.json")):
        if jax.process_index() == 0:
            print(f"preparing the embedded default corpus (Python stdlib source) into {cfg.data} ...")
            prepare("stdlib", cfg.data, tokenizer="byte")
        _barrier("jaxgpt_default_corpus")
    return load_meta(cfg.data)


def checked(cfg: Config) -> tuple[Config, dict]:
    """(cfg with the data's vocabulary and classes, the data's meta), or a one-line UserError.
    A config that cannot work fails before anything is read or prepared (preparing the default
    corpus takes minutes); with init_from the model comes from that checkpoint, checked later."""
    early = cfg if cfg.init_from == "scratch" else dataclasses.replace(cfg, model=ModelConfig())
    blocks = parallel.check_layout(early, jax.device_count(), model=cfg.init_from == "scratch")
    early.validate(blocks)
    meta = ensure_data(cfg)
    check_task(cfg.task, meta.get("kind", "stream"))
    if cfg.task == "classify":
        check_labels(Dataset(cfg.data, "train", meta), Dataset(cfg.data, "val", meta))
    n_classes = len(meta.get("labels") or []) if cfg.task == "classify" else 0
    cfg = replace_model(cfg, vocab_size=int(meta["vocab_size"]), n_classes=n_classes)
    cfg.validate(blocks)
    return cfg, meta


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


class Trainer:
    """The loop over steps, and what it does at log, eval and save steps."""

    def __init__(self, cfg: Config, meta: dict, strategy, state: dict, step: int,
                 guard: faults.RunGuard, quiet: bool):
        self.cfg, self.strategy, self.state, self.step, self.guard = cfg, strategy, state, step, guard
        self.quiet, self.primary = quiet, jax.process_index() == 0
        self.start_step = step
        self.tokenizer = meta.get("tokenizer")
        self.batches = TrainBatches(cfg, meta, strategy, guard)
        self.evaluate = Evaluator(cfg, self.batches.eval, strategy)
        if self.primary:
            os.makedirs(cfg.out, exist_ok=True)
            self.logger = MetricsLogger(cfg.out, step, cfg.to_dict(), cfg.tensorboard, cfg.wandb)
        else:
            self.logger = _ReadOnlyLog(cfg.out, step)
        self.stopping = EarlyStopping(cfg, self.logger.rows)
        self.writer = ckpt.CheckpointWriter(cfg.out, cfg.keep, blocking=not cfg.async_save)
        self.base_meta = {"tokenizer": self.tokenizer, "data_meta": meta, "config": cfg.to_dict()}
        self.meter = Meter(cfg, strategy, step, quiet)
        self.pending = None  # the log step whose row is written after the next step's dispatch
        self.prev_metrics = None  # the step in flight before this one
        self.last_eval: dict = {}
        self.stop_reason = None
        self.interrupted = False

    def run(self) -> dict:
        try:
            self._steps()
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            self._finish()
        if self.stop_reason and not self.quiet:
            print(self.stop_reason)
        if not self.quiet and not self.interrupted and self.cfg.task == "lm" and jax.process_count() == 1:
            _print_sample(self.strategy, self.state, self.tokenizer)
        if self.interrupted:
            stop = self.guard.interrupted(self.step)  # FAULTS: exit code 75 (SIGTERM) or 130 (Ctrl-C)
            if self.primary:
                print(f"interrupted at step {self.step}; " + (f"checkpoint saved in {self.cfg.out}"
                      if stop.saved else "nothing saved") + " (resume=auto continues from the latest checkpoint)")
            raise stop
        return {"step": self.step, **self.last_eval, "stopped_early": bool(self.stop_reason)}

    def _steps(self) -> None:
        cfg, guard = self.cfg, self.guard
        while self.step < cfg.max_steps:
            if guard.stop_requested:  # FAULTS: SIGTERM/Ctrl-C stop at a step boundary
                self.interrupted = True
                break
            batch = self.batches.get(self.step)  # built while the previous step ran
            self.state, metrics = self.strategy.step(self.state, batch)
            if self.step + 1 < cfg.max_steps:
                self.batches.prefetch(self.step + 1)  # built while this step runs
            # At most two steps in flight. An unbounded queue (a long log_interval never syncs)
            # deadlocks XLA:CPU's in-process all-reduce on simulated devices, and holds a
            # batch per queued step in memory on any backend.
            if self.prev_metrics is not None:
                jax.block_until_ready(self.prev_metrics)
                guard.observe(self.step, self.prev_metrics, self.logger)  # FAULTS: nan_policy, one step late
            self.prev_metrics = metrics
            self.step += 1
            if self._after_step(metrics):
                break

    def _after_step(self, metrics) -> bool:
        """Logging, eval, early stopping and the periodic save of the step just dispatched;
        True to stop (early stopping)."""
        cfg, step = self.cfg, self.step
        self.meter.bar.update(1)
        if self.pending is not None:  # the previous log step, read after this step was dispatched
            self.logger.log(self.meter.row(self.pending))
            self.pending = None
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            self.pending = self.meter.log_step(step, metrics)
        self.meter.count_step()
        evaluated = step % cfg.eval_interval == 0 or step == cfg.max_steps
        if evaluated or step % cfg.save_interval == 0:
            self.guard.observe(step, metrics, self.logger)  # FAULTS: no eval or save of a bad step
        if evaluated and self._eval(step):
            return True
        if step % cfg.save_interval == 0:
            self.save(step, self.last_eval if evaluated else None)
        return False

    def _eval(self, step: int) -> bool:
        """Evaluate, log, keep the best checkpoint; True when early stopping ends the run."""
        self.last_eval = self.evaluate(self.state["params"])
        row = self.meter.row(self.pending) if self.pending else {"step": step}
        self.pending = None
        # the per-step train_loss stays; the eval's train-split loss gets its own key
        self.logger.log({**row, **{("eval_train_" + k[6:] if k.startswith("train_") else k): v
                                   for k, v in self.last_eval.items()}})
        self.logger.plot()
        if self.primary:  # (written even when quiet, as the eval line always was)
            self.meter.bar.write(" | ".join([f"step {step}"] + [f"{k} {v:.4f}" for k, v in self.last_eval.items()]))
        if self.stopping.update(self.last_eval):
            self.save(step, self.last_eval)  # the best checkpoint is always kept
        self.meter.pause()  # eval time is not training throughput
        self.stop_reason = self.stopping.stop_reason(step)
        return self.stop_reason is not None

    def save(self, step: int, metrics: dict | None = None) -> None:
        if self.pending is not None:  # FAULTS: a saved step's metrics row is on disk before it
            self.logger.log(self.meter.row(self.pending))
            self.pending = None
        g = self.strategy.gather(self.state)
        train = {"opt_state": start.flatten_opt(g["opt_state"]), "step": g["step"], "rng": g["rng"]}
        self.writer.save(step, g["params"], train, dict(self.base_meta, metrics=metrics or {}))

    def _finish(self) -> None:
        cfg, guard = self.cfg, self.guard
        if self.pending is not None:
            self.logger.log(self.meter.row(self.pending))
            self.pending = None  # FAULTS: save() below would log it again
        self.meter.bar.close()
        self.batches.close()
        try:
            if guard.may_save and self.prev_metrics is not None:  # FAULTS: the last step, before its save
                guard.observe(self.step, self.prev_metrics, self.logger)
            if guard.may_save:  # FAULTS: nothing is saved after nan_policy stopped the run
                self.save(self.step, self.last_eval if self.last_eval and self.step % cfg.eval_interval == 0 else None)
            if self.logger.rows:  # the final loss.png (evals redraw it at most every 30 s)
                self.logger.plot(final=True)
        finally:
            self.writer.close()
            self.logger.close()


class TrainBatches:
    """This process's rows of each global batch: train batches built one step ahead on a
    thread (`Batcher.prefetch`), the eval batchers, and their placement."""

    def __init__(self, cfg: Config, meta: dict, strategy, guard):
        self.cfg, self.strategy, self.guard = cfg, strategy, guard
        T = cfg.model.block_size
        train_ds, val_ds = Dataset(cfg.data, "train", meta), Dataset(cfg.data, "val", meta)
        self.train = Batcher(train_ds, cfg.task, cfg.batch_size, T, cfg.seed,
                             rows=strategy.rows(cfg.batch_size))
        eval_bs = cfg.batch_size // cfg.grad_accum  # one micro-batch per block, as a step's
        self.eval = {split: Batcher(ds, cfg.task, eval_bs, T, cfg.seed, rows=strategy.rows(eval_bs))
                     for split, ds in (("train", train_ds), ("val", val_ds))}
        if cfg.task == "sft" and (self.train.truncated or self.train.dropped) and jax.process_index() == 0:
            print(f"sft: {self.train.truncated} train examples truncated from the left of the prompt, "
                  f"{self.train.dropped} dropped (completion longer than block_size={T})")

    def prefetch(self, step: int) -> None:
        self.train.prefetch(step)

    def get(self, step: int):
        rows = self.guard.batch(step, self.train.batch(step))  # FAULTS: test faults
        return self.strategy.shard_batch(rows, self.cfg.batch_size)

    def close(self) -> None:
        self.train.close()


class Meter:
    """The progress bar, tokens/s between log steps, MFU, and the metrics row of a log step."""

    def __init__(self, cfg: Config, strategy, start_step: int, quiet: bool):
        from tqdm.auto import tqdm

        devices = jax.devices()
        n_params = count_params(start.abstract_model(cfg))
        self.flops_tok = flops_per_token(cfg, n_params)
        self.peak = mfu_peak(cfg.dtype)  # every device of every host (None: unknown accelerator)
        self.tokens_per_step = cfg.batch_size * cfg.model.block_size
        # One jitted program: called eagerly, the schedule's dozen ops each compile on the first
        # log row (~0.35 s on 2 CPU cores, in every run: programs that small are not cached).
        self.sched = jax.jit(lr_schedule(cfg))
        self.strategy = strategy
        self.t_last, self.steps_timed = None, 0
        if not quiet:
            print(f"model: {n_params / 1e6:.2f}M params | devices: {len(devices)} x {devices[0].platform}, "
                  f"{strategy.describe()} | batch {cfg.batch_size} x {cfg.model.block_size} tokens | "
                  f"steps {start_step}->{cfg.max_steps}")
        self.bar = tqdm(total=cfg.max_steps, initial=start_step, disable=quiet, dynamic_ncols=True, unit="step")

    def count_step(self) -> None:
        self.steps_timed += 1

    def pause(self) -> None:
        self.t_last = None

    def log_step(self, step: int, metrics) -> dict:
        """What a log step remembers until its row is written (one step later)."""
        now = time.perf_counter()
        tps = None
        if self.t_last is not None and self.steps_timed:
            tps = self.tokens_per_step * self.steps_timed / (now - self.t_last)
        self.t_last, self.steps_timed = now, 0
        return {"step": step, "m": metrics, "tps": tps}

    def row(self, p: dict) -> dict:
        """The metrics row of a log step (and the progress bar's postfix)."""
        m, step = self.strategy.host(p["m"]), p["step"]
        row = {"step": step, "train_loss": float(m["loss"]), "lr": float(self.sched(step - 1)),
               "grad_norm": float(m["grad_norm"])}
        if "acc" in m:
            row["train_acc"] = float(m["acc"])
        post = {"loss": f"{row['train_loss']:.4f}", "lr": f"{row['lr']:.2e}"}
        if p["tps"]:
            row["tokens_per_s"] = p["tps"]
            post["tok/s"] = f"{p['tps']:.0f}"
            if self.peak is not None:
                row["mfu"] = p["tps"] * self.flops_tok / self.peak.flops
                post["mfu"] = f"{100 * row['mfu']:.1f}%"
        self.bar.set_postfix(post)
        return row


class _ReadOnlyLog:
    """Processes other than 0 write no metrics; they read the history of a resumed run (for
    early stopping's bookkeeping, which every process must agree on)."""

    def __init__(self, out: str, resume_step: int):
        self.rows = []
        try:
            with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= resume_step:
                        self.rows.append(row)
        except OSError:
            pass

    def log(self, row: dict) -> None:
        pass

    def mark_skipped(self, step: int, own_row: bool, **fields) -> None:
        pass

    def plot(self, final: bool = False) -> None:
        pass

    def close(self) -> None:
        pass


def _print_sample(strategy, state, tokenizer_name, n_tokens: int = 256) -> None:
    """A sample from <|endoftext|> at the end of a run: the quickest check of what was learned."""
    from jaxgpt.generation import generate
    from jaxgpt.tokenizer import get_tokenizer

    if tokenizer_name is None:
        return
    tok = get_tokenizer(tokenizer_name)
    model = nnx.merge(strategy.graphdef, strategy.params_for_sampling(state))
    out = generate(model, [[tok.eot_id]], n_tokens, temperature=0.8, top_k=40, seed=0)[0]
    print("---- sample (temperature 0.8, top-k 40) ----")
    print(tok.decode(out))
    print("--------------------------------------------")
