"""Where training metrics go: out/metrics.jsonl, out/loss.png, TensorBoard, Weights & Biases."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.errors import UserError


class MetricsLogger:
    """metrics.jsonl (one JSON object per row, appended), loss.png, TensorBoard, W&B.

    Resuming: the rows of steps after `resume_step` (the step the run restarts from, which after
    a fallback to an older checkpoint is that older step) belong to a timeline that is being
    replayed, so they are dropped when the file is reopened; the rows up to it stay. A line cut
    short by a kill is dropped too. The file is rewritten through a temporary file and a rename,
    so a kill during that leaves the old file. The loop writes a saved step's row before the
    checkpoint, so no row of a step at or before the restored one can go missing.
    Non-finite values are written as null (NaN is not JSON). A step skipped by nan_policy=skip
    gets `"skipped": true` (and `skipped_total`) in its row, or a row of its own when it is not
    a logged step."""

    def __init__(self, out_dir: str, resume_step: int, cfg_dict: dict, tensorboard: bool, wandb: bool):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.png = os.path.join(out_dir, "loss.png")
        self._plotted_at, self._plotted_rows = None, -1  # when the last plot was drawn, of how many rows
        self.rows: list[dict] = []
        self._skipped: dict[int, dict] = {}  # marks for rows not yet written
        try:
            if os.path.exists(self.path):  # keep history up to the resumed step, drop what follows it
                with open(self.path, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError:
                            continue
                        step = row.get("step") if isinstance(row, dict) else None
                        if isinstance(step, int) and step <= resume_step:
                            self.rows.append(row)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.rows)
            os.replace(tmp, self.path)
        except OSError as e:
            raise UserError(f"cannot write {self.path}: {e.strerror or e}") from None
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

    def mark_skipped(self, step: int, own_row: bool, **fields) -> None:
        """Step `step` was skipped by nan_policy=skip: mark its row (written later), or write a
        row of its own when the step is not otherwise logged."""
        if own_row:
            self.log({"step": step, **fields, "skipped": True})
        else:
            self._skipped[step] = dict(fields, skipped=True)

    def log(self, row: dict) -> None:
        row = {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in row.items()}
        row.update(self._skipped.pop(row["step"], {}))
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.rows.append(row)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise UserError(f"cannot write {self.path}: {e.strerror or e}") from None
        step = row["step"]
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)
        if self.wb is not None:
            self.wb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    PLOT_EVERY_S = 30.0

    def plot(self, final: bool = False) -> None:
        """Redraw loss.png: at most every PLOT_EVERY_S seconds during a run, and always for the
        final one. A drawing costs ~0.15 s of the loop's time (more the first time: matplotlib's
        import); at every eval it was ~1% of nanoGPT's CPU recipe."""
        now = time.perf_counter()
        if len(self.rows) == self._plotted_rows or (
                not final and self._plotted_at is not None and now - self._plotted_at < self.PLOT_EVERY_S):
            return
        self._plotted_at, self._plotted_rows = now, len(self.rows)
        # The object API, not pyplot: no global figure registry, no GUI backend to pick.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        tr = [(r["step"], r["train_loss"]) for r in self.rows if r.get("train_loss") is not None]
        va = [(r["step"], r["val_loss"]) for r in self.rows if r.get("val_loss") is not None]
        fig = Figure(figsize=(7, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
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
        try:
            fig.savefig(tmp, dpi=100)
            os.replace(tmp, self.png)
        except OSError as e:
            raise UserError(f"cannot write {self.png}: {e.strerror or e}") from None

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


# ----------------------------------------------------------------------------- MFU peak
# The MFU denominator. Accelerators: the vendor's dense (not 2:4-sparse) peak for the compute
# dtype, looked up by the exact `device_kind` JAX reports. Unknown accelerators get None (the
# loop then reports no MFU) instead of a guess: a near-miss name (an A10 for an A100, a MIG
# slice, an A10G) must not borrow another chip's peak. CPUs have no honest spec number, so the
# peak there is a measured float matmul, labelled as such.
#
# dtype rules:
# - bfloat16: the dense BF16 tensor-core / MXU peak.
# - float32 on NVIDIA Ampere and newer: the dense TF32 peak. XLA runs float32 dots on TF32 tensor
#   cores at JAX's default matmul precision, so that is the rate a float32 step can approach.
# - V100 and T4 have no BF16 tensor cores (their tensor cores take FP16 only): XLA upcasts bf16
#   dots to float32 there, so both dtypes use the plain FP32 (CUDA core) peak.
# - TPU: float32 uses the bf16 peak. At the default matmul precision XLA:TPU runs a float32 dot
#   as one bfloat16 MXU pass. (With jax_default_matmul_precision="highest", 6 passes, MFU then
#   reads about 6x lower, which is what the hardware is doing.)
# - TPU v2/v3 expose each of a chip's two TensorCores as a JAX device: the peak is per core.


@dataclasses.dataclass(frozen=True)
class Peak:
    """A peak FLOP/s for the MFU estimate and where it came from.

    flops: the total over `n_devices` devices (what MFU divides by); per_device: one device's;
    source: "spec:<device_kind>" (vendor spec sheet) or "measured-matmul (CPU)"."""
    flops: float
    per_device: float
    n_devices: int
    dtype: str
    source: str

    def describe(self) -> str:
        return (f"{self.flops / 1e12:.4g} TFLOP/s {self.dtype} "
                f"({self.n_devices} x {self.per_device / 1e12:.4g}, {self.source})")


@dataclasses.dataclass(frozen=True)
class _Spec:
    name: str                 # what the chip is, for humans
    kinds: tuple[str, ...]    # device_kind strings (and aliases) that mean exactly this chip
    bf16: float               # dense peak FLOP/s of one JAX device, bfloat16
    f32: float                # dense peak FLOP/s of one JAX device, float32 (TF32 where it applies)
    source: str


_T = 1e12
_SPECS: tuple[_Spec, ...] = (
    # --- NVIDIA Hopper. Datasheets print sparse figures: the dense ones are half.
    _Spec("H100 SXM5", ("NVIDIA H100 80GB HBM3", "H100 SXM", "H100 SXM5"), 989.4 * _T, 494.7 * _T,
          "NVIDIA H100 Tensor Core GPU datasheet, SXM: BF16 1979 / TF32 989 TFLOPS sparse"),
    _Spec("H100 PCIe", ("NVIDIA H100 PCIe",), 756.5 * _T, 378.0 * _T,
          "NVIDIA H100 datasheet, PCIe: BF16 1513 / TF32 756 TFLOPS sparse"),
    _Spec("H100 NVL", ("NVIDIA H100 NVL",), 835.5 * _T, 417.5 * _T,
          "NVIDIA H100 datasheet, NVL (per GPU): BF16 1671 / TF32 835 TFLOPS sparse"),
    _Spec("H200 SXM", ("NVIDIA H200", "H200 SXM"), 989.4 * _T, 494.7 * _T,
          "NVIDIA H200 datasheet, SXM: BF16 1979 / TF32 989 TFLOPS sparse (H100 SXM's compute)"),
    _Spec("H200 NVL", ("NVIDIA H200 NVL",), 835.5 * _T, 417.5 * _T,
          "NVIDIA H200 datasheet, NVL: BF16 1671 / TF32 835 TFLOPS sparse"),
    _Spec("GH200", ("NVIDIA GH200 480GB", "GH200"), 989.4 * _T, 494.7 * _T,
          "NVIDIA GH200 Grace Hopper datasheet: BF16 1979 / TF32 989 TFLOPS sparse"),
    # --- NVIDIA Ampere / Ada
    _Spec("A100", ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB",
                   "NVIDIA A100 80GB PCIe", "A100"), 312.0 * _T, 156.0 * _T,
          "NVIDIA A100 datasheet (all four 40/80GB SXM/PCIe parts): BF16 312 / TF32 156 TFLOPS dense"),
    _Spec("A10", ("NVIDIA A10",), 125.0 * _T, 62.5 * _T,
          "NVIDIA A10 datasheet: BF16 125 / TF32 62.5 TFLOPS dense (250 / 125 sparse)"),
    _Spec("L4", ("NVIDIA L4",), 121.0 * _T, 60.0 * _T,
          "NVIDIA L4 datasheet: BF16 242 / TF32 120 TFLOPS sparse"),
    _Spec("L40S", ("NVIDIA L40S",), 362.05 * _T, 183.0 * _T,
          "NVIDIA L40S datasheet: BF16 362.05 / TF32 183 TFLOPS dense (733 / 366 sparse)"),
    _Spec("L40", ("NVIDIA L40",), 181.05 * _T, 90.5 * _T,
          "NVIDIA L40 datasheet: BF16 181.05 / TF32 90.5 TFLOPS dense (362.1 / 181 sparse)"),
    # --- NVIDIA Volta / Turing: no BF16 or TF32 tensor cores; plain FP32 for both dtypes.
    _Spec("V100 SXM2", ("Tesla V100-SXM2-16GB", "Tesla V100-SXM2-32GB", "V100 SXM2"),
          15.7 * _T, 15.7 * _T, "NVIDIA V100 datasheet, SXM2: FP32 15.7 TFLOPS"),
    _Spec("V100 PCIe", ("Tesla V100-PCIE-16GB", "Tesla V100-PCIE-32GB", "V100 PCIe"),
          14.0 * _T, 14.0 * _T, "NVIDIA V100 datasheet, PCIe: FP32 14 TFLOPS"),
    _Spec("V100S PCIe", ("Tesla V100S-PCIE-32GB", "V100S PCIe"), 16.4 * _T, 16.4 * _T,
          "NVIDIA V100S datasheet: FP32 16.4 TFLOPS"),
    _Spec("T4", ("Tesla T4",), 8.1 * _T, 8.1 * _T, "NVIDIA T4 datasheet: FP32 8.1 TFLOPS"),
    # --- Google TPU: bf16 MXU peak per JAX device (Cloud TPU docs, system architecture pages).
    _Spec("TPU v2", ("TPU v2",), 22.5 * _T, 22.5 * _T,
          "Cloud TPU docs: v2 chip 45 TFLOPS bf16, 2 TensorCores = 2 JAX devices"),
    _Spec("TPU v3", ("TPU v3",), 61.5 * _T, 61.5 * _T,
          "Cloud TPU docs: v3 chip 123 TFLOPS bf16, 2 TensorCores = 2 JAX devices"),
    _Spec("TPU v4", ("TPU v4",), 275.0 * _T, 275.0 * _T,
          "Cloud TPU docs, TPU v4: 275 TFLOPS bf16 per chip (megacore: 1 JAX device per chip)"),
    _Spec("TPU v5e", ("TPU v5 lite", "TPU v5e"), 197.0 * _T, 197.0 * _T,
          "Cloud TPU docs, TPU v5e: 197 TFLOPS bf16 per chip"),
    _Spec("TPU v5p", ("TPU v5", "TPU v5p"), 459.0 * _T, 459.0 * _T,
          "Cloud TPU docs, TPU v5p: 459 TFLOPS bf16 per chip"),
    _Spec("TPU v6e", ("TPU v6 lite", "TPU v6e"), 918.0 * _T, 918.0 * _T,
          "Cloud TPU docs, Trillium (v6e): 918 TFLOPS bf16 per chip"),
)

_VENDOR_PREFIXES = ("nvidia ", "tesla ")


def normalize_kind(kind: str) -> str:
    """The lookup key of a device kind: lowercase, '-'/'_' as spaces, single spaces, no vendor
    prefix. Matching stays exact on what remains, so "A10" and "A100" stay different chips."""
    k = " ".join(kind.lower().replace("-", " ").replace("_", " ").split())
    for p in _VENDOR_PREFIXES:
        if k.startswith(p):
            k = k[len(p):]
    return k


def _index() -> dict[str, _Spec]:
    out: dict[str, _Spec] = {}
    for spec in _SPECS:
        for alias in spec.kinds:
            key = normalize_kind(alias)
            if key in out:
                raise AssertionError(f"device kind {alias!r} listed twice ({out[key].name}, {spec.name})")
            out[key] = spec
    return out


_BY_KIND = _index()
_ACCELERATOR_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


def resolve_dtype(dtype: str, backend: str | None = None) -> str:
    """"bfloat16" or "float32". "auto" means bfloat16 on GPU/TPU and float32 on CPU, decided by
    `backend` (default: jax.default_backend())."""
    d = str(dtype).lower()
    if d == "auto":
        backend = jax.default_backend() if backend is None else backend
        return "bfloat16" if backend.lower() in _ACCELERATOR_BACKENDS else "float32"
    if d in ("bfloat16", "bf16"):
        return "bfloat16"
    if d in ("float32", "f32", "fp32", "tf32"):
        return "float32"
    raise ValueError(f"no MFU peak for dtype {dtype!r}: use bfloat16, float32 or auto")


def spec_peak(device_kind: str, dtype: str) -> float | None:
    """Dense spec-sheet peak FLOP/s of one device of this exact kind, or None if not in the table.
    `dtype` is "bfloat16" or "float32" (resolve "auto" first). Pure: no device is touched."""
    spec = _BY_KIND.get(normalize_kind(device_kind))
    if spec is None:
        return None
    return spec.bf16 if resolve_dtype(dtype, backend="gpu") == "bfloat16" else spec.f32


def spec_source(device_kind: str) -> str | None:
    """The spec-sheet line behind `spec_peak(device_kind, ...)`, or None."""
    spec = _BY_KIND.get(normalize_kind(device_kind))
    return None if spec is None else f"{spec.name}: {spec.source}"


_MEASURED: dict = {}


def measured_matmul_peak(dtype: str, n: int = 2048, reps: int = 2) -> float:
    """FLOP/s of the faster of `reps` jitted n x n matmuls on the default device, after a warm-up.
    2048^2 float32 is ~17 GFLOP a product, ~0.1 s on 2 cores: far from launch-bound."""
    key = (jax.default_backend(), dtype, n)
    if key not in _MEASURED:
        jdt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
        a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32), jdt)
        f = jax.jit(lambda x: x @ x)
        f(a).block_until_ready()
        best = math.inf
        for _ in range(reps):
            t = time.perf_counter()
            f(a).block_until_ready()
            best = min(best, time.perf_counter() - t)
        _MEASURED[key] = 2 * n ** 3 / best
    return _MEASURED[key]


CPU_SOURCE = "measured-matmul (CPU)"


def device_peak(dtype: str, device=None) -> tuple[float, str] | None:
    """(peak FLOP/s of one device, source) or None for an accelerator missing from the table.
    CPU: the measured matmul (the simulated devices of one host share its cores, so this is the
    whole host's figure, not one simulated device's)."""
    device = jax.local_devices()[0] if device is None else device
    dt = resolve_dtype(dtype, device.platform)
    if device.platform == "cpu":
        return measured_matmul_peak(dt), CPU_SOURCE
    value = spec_peak(device.device_kind, dt)
    return None if value is None else (value, f"spec:{device.device_kind}")


def mfu_peak(dtype: str, devices=None) -> Peak | None:
    """The peak of the whole run, the MFU denominator for global tokens/s; None when unknown.

    Accelerators: the sum of each device's spec peak over `devices` (default jax.devices(),
    every device of every host, so multi-host runs use the global count); None if any device's
    kind is not in the table. CPU: this host's measured matmul x jax.process_count()."""
    devices = list(jax.devices() if devices is None else devices)
    dt = resolve_dtype(dtype, devices[0].platform)
    if devices[0].platform == "cpu":
        per = measured_matmul_peak(dt)
        n = jax.process_count()
        return Peak(per * n, per, n, dt, CPU_SOURCE)
    total, kinds = 0.0, []
    for d in devices:
        v = spec_peak(d.device_kind, dt)
        if v is None:
            return None
        total += v
        if d.device_kind not in kinds:
            kinds.append(d.device_kind)
    return Peak(total, total / len(devices), len(devices), dt, "spec:" + "+".join(kinds))


def peak_flops(dtype: str) -> float | None:
    """Peak FLOP/s of one local device (the old interface): the spec number on an accelerator
    in the table, None on one that is not, the measured matmul on CPU. New code: `mfu_peak`."""
    got = device_peak(dtype)
    return None if got is None else got[0]
