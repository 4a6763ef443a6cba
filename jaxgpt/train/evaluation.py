"""Evaluation during training, and early stopping on its result.

`Evaluator` runs the eval passes of both splits through the strategy (the same global eval
batches on every layout: each process builds its rows, the sums are global) and returns
{"train_loss", "val_loss"} (and accuracies for classifiers). `EarlyStopping` keeps the best
val metric and the evals since it improved, continuing the bookkeeping of a resumed run from
its metrics rows.
"""

from __future__ import annotations

import math

import jax

from jaxgpt.config import Config
from jaxgpt.data import Batcher

_SUMS = ("loss_sum", "count", "correct")


class Evaluator:
    def __init__(self, cfg: Config, batchers: dict[str, Batcher], strategy):
        self.cfg, self.batchers, self.strategy = cfg, batchers, strategy

    def __call__(self, params) -> dict:
        out = {}
        for split, b in self.batchers.items():
            tot = dict.fromkeys(_SUMS, 0.0)
            # The host builds the next batch while the device runs this one, and reads the sums
            # once per split. At most two passes in flight, as in the train loop (an unbounded
            # queue deadlocks XLA:CPU's in-process all-reduce on simulated devices).
            sums = []
            for i in range(b.eval_passes(self.cfg.eval_steps)):
                batch = self.strategy.shard_batch(b.batch(i, train=False), b.B, train=False)
                if i >= 2:
                    jax.block_until_ready(sums[i - 2])
                sums.append({k: v for k, v in self.strategy.evaluate(params, batch).items() if k in tot})
            for got in self.strategy.host(sums):
                for k, v in got.items():
                    tot[k] += float(v)
            out[f"{split}_loss"] = tot["loss_sum"] / max(tot["count"], 1.0)
            if self.cfg.task == "classify":
                out[f"{split}_acc"] = tot["correct"] / max(tot["count"], 1.0)
        return out


class EarlyStopping:
    """Best val metric (val loss, or val accuracy for classifiers) and evals since it improved."""

    def __init__(self, cfg: Config, history: list[dict]):
        self.patience = cfg.early_stop_patience
        self.select = "val_acc" if cfg.task == "classify" else "val_loss"
        self.sign = -1.0 if self.select == "val_acc" else 1.0
        self.best, self.since_best = math.inf, 0
        for row in history:  # a resumed run continues the bookkeeping
            if row.get(self.select) is not None:
                self.update(row)

    def update(self, metrics: dict) -> bool:
        """Record an eval; True when it is the best so far."""
        v = self.sign * metrics[self.select]
        if v < self.best:
            self.best, self.since_best = v, 0
            return True
        self.since_best += 1
        return False

    def stop_reason(self, step: int) -> str | None:
        if self.patience and self.since_best >= self.patience:
            return (f"early stopping at step {step}: {self.select} has not improved for "
                    f"{self.since_best} evals (best {self.sign * self.best:.4f})")
        return None
