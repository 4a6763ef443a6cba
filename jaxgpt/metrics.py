"""Where training metrics go: out/metrics.jsonl, out/loss.png, TensorBoard, Weights & Biases."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.errors import UserError


class MetricsLogger:
    def __init__(self, out_dir: str, resume_step: int, cfg_dict: dict, tensorboard: bool, wandb: bool):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.png = os.path.join(out_dir, "loss.png")
        self.rows: list[dict] = []
        if os.path.exists(self.path):  # keep history up to the resumed step, drop what follows it
            with open(self.path) as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if row.get("step", 1 << 62) <= resume_step:
                        self.rows.append(row)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)
        os.replace(tmp, self.path)
        self.tb = self.wb = None
        if tensorboard:
            self.tb = _tensorboard_writer(os.path.join(out_dir, "tb"))
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                raise UserError("wandb=true but wandb is not installed; `pip install wandb` "
                                "(or drop wandb=true)") from None
            self.wb = wb
            wb.init(project="jaxgpt", config=cfg_dict, resume="allow")

    def log(self, row: dict) -> None:
        row = {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in row.items()}
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        step = row["step"]
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.wb is not None:
            self.wb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def plot(self) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tr = [(r["step"], r["train_loss"]) for r in self.rows if r.get("train_loss") is not None]
        va = [(r["step"], r["val_loss"]) for r in self.rows if r.get("val_loss") is not None]
        fig, ax = plt.subplots(figsize=(7, 4))
        if tr:
            ax.plot(*zip(*tr), label="train (step)", alpha=0.6)
        if va:
            ax.plot(*zip(*va), "o-", label="val (eval)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.png + ".tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.png)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


def _tensorboard_writer(logdir: str):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("tensorboard=true but neither tensorboardX nor torch's tensorboard is "
                            "installed; `pip install tensorboardX` (or drop tensorboard=true)") from None
    return SummaryWriter(logdir)


_PEAK_CACHE: dict = {}

# Dense peak FLOP/s per accelerator (bf16 / f32-tf32), from vendor spec sheets.
_GPU_PEAKS = {"H100": (989e12, 495e12), "H200": (989e12, 495e12), "A100": (312e12, 156e12),
              "L4": (121e12, 60e12), "A10": (125e12, 62e12), "V100": (125e12, 15.7e12)}


def peak_flops(dtype: str) -> float:
    """Peak FLOP/s of one local device, for the MFU estimate.

    GPUs: the spec-sheet number. CPUs have no meaningful spec number, so the peak is the measured
    throughput of a large float32 matmul on this machine (MFU then reads as "fraction of what the
    best single matmul achieves here").
    """
    dev = jax.local_devices()[0]
    key = (dev.platform, dev.device_kind, dtype)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    peak = None
    if dev.platform == "gpu":
        for name, (bf16, f32) in _GPU_PEAKS.items():
            if name in dev.device_kind:
                peak = bf16 if dtype == "bfloat16" else f32
    elif dev.platform == "tpu":
        peak = 197e12
    if peak is None:
        n = 1024
        a = jnp.ones((n, n), jnp.float32)
        f = jax.jit(lambda x: x @ x)
        f(a).block_until_ready()
        t = time.perf_counter()
        for _ in range(5):
            r = f(a)
        r.block_until_ready()
        peak = 5 * 2 * n ** 3 / (time.perf_counter() - t)
    _PEAK_CACHE[key] = peak
    return peak
