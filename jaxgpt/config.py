"""One frozen config schema; presets and the command line are overrides of it.

A run is described by `Config` (training knobs) holding a `ModelConfig`. Both are frozen,
hashable dataclasses, so jit can take them as static data, and both round-trip through JSON so
every checkpoint carries the exact config that produced it.

Overrides use dotted keys (`model.n_layer=4`, `lr=1e-3`); preset files in `configs/` are Python
files that define a dict `overrides` with the same keys and set only what differs from here.
The dataclass defaults *are* the embedded default job (`configs/stdlib_small.py`): a small
byte-level model on the Python standard library source that trains on 2 CPU cores in minutes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import runpy
import typing
from dataclasses import dataclass, field

from jaxgpt.errors import UserError

VOCAB_MULTIPLE = 64  # pad the embedding table so matmuls tile well; padded ids are never predicted


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 257  # real vocabulary; comes from the data (byte tokenizer: 256 + <|endoftext|>)
    block_size: int = 128  # maximum context length (learned positions)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    n_classes: int = 0  # > 0 adds a classification head (task=classify)

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise UserError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UserError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                f"valid n_head values: {[h for h in range(1, self.n_embd + 1) if self.n_embd % h == 0]}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.n_classes < 0:
            raise UserError(f"model.n_classes must be >= 0, got {self.n_classes}")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh of `parallel=mesh` (see jaxgpt/train/parallel.py): axis sizes whose product is
    the global device count; one of them may be -1, "the rest of the devices"."""
    data: int = -1  # pure data parallelism: params replicated, batch split
    fsdp: int = 1  # ZeRO-3: params, grads and optimizer state sharded; batch split too
    tensor: int = 1  # Megatron tensor parallelism inside each block

    def sizes(self, n_devices: int) -> dict:
        """{'data', 'fsdp', 'tensor'} -> size, with -1 resolved; UserError if impossible."""
        raw = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        bad = {k: v for k, v in raw.items() if v == 0 or v < -1}
        if bad:
            raise UserError(f"mesh axis sizes must be >= 1 or -1, got "
                            + ", ".join(f"mesh.{k}={v}" for k, v in bad.items()))
        rest = [k for k, v in raw.items() if v == -1]
        if len(rest) > 1:
            raise UserError(f"only one mesh axis may be -1, got {', '.join('mesh.' + k for k in rest)}")
        known = 1
        for k, v in raw.items():
            known *= v if v != -1 else 1
        if rest:
            if n_devices % known:
                raise UserError(f"the mesh needs a multiple of {known} devices "
                                f"(mesh.data x mesh.fsdp x mesh.tensor), but there are {n_devices}")
            raw[rest[0]] = n_devices // known
        elif known != n_devices:
            raise UserError(f"mesh.data x mesh.fsdp x mesh.tensor = {raw['data']} x {raw['fsdp']} x "
                            f"{raw['tensor']} = {known}, but there are {n_devices} devices")
        return raw


TASKS = ("lm", "sft", "classify")
DTYPES = ("auto", "float32", "bfloat16")
ATTENTION = ("auto", "xla", "cudnn", "cpu")
REMAT = ("none", "dots", "full")
PARALLEL = ("pmap", "mesh")
DISTRIBUTED = ("auto", "on", "off")
NAN_POLICIES = ("stop", "skip")
FREEZE = ("none", "body")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: str = "data/stdlib"  # folder written by `jaxgpt prepare`
    out: str = "out/stdlib_small"  # checkpoints, metrics.jsonl, loss.png
    init_from: str = "scratch"  # scratch | a checkpoint folder | gpt2 | gpt2-medium | ...
    task: str = "lm"  # lm | sft | classify
    batch_size: int = 16  # global batch, split over devices and grad_accum micro-steps
    grad_accum: int = 1
    max_steps: int = 2000  # the default job: ~6 min on 2 CPU cores
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    decay_steps: int = 0  # 0 means max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    log_interval: int = 10
    eval_interval: int = 250
    eval_steps: int = 10
    save_interval: int = 500
    async_save: bool = False  # true: train on while a checkpoint is written (a kill may lose up to 2 x save_interval)
    keep: int = 2
    seed: int = 1337
    dtype: str = "auto"  # compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU; params stay float32
    attention: str = "auto"  # auto | xla | cudnn | cpu (see jaxgpt/attention.py)
    remat: str = "none"  # none | dots | full: what the backward recomputes (see jaxgpt/model.py)
    parallel: str = "pmap"  # pmap (replicated data parallel) | mesh (jit over a device mesh)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: str = "auto"  # auto | on | off: call jax.distributed.initialize() (multi-host)
    coordinator: str = ""  # HOST:PORT of process 0 (distributed=on; else from the environment)
    num_processes: int = 0  # 0 = from the environment / cluster
    process_id: int = -1  # -1 = from the environment / cluster
    nan_policy: str = "stop"  # stop | skip: what a non-finite loss or gradient norm does
    nan_max_skips: int = 10  # nan_policy=skip: stop after this many consecutive skipped steps
    resume: str = "auto"  # auto | never
    tensorboard: bool = False
    wandb: bool = False
    freeze: str = "none"  # none | body (fine-tuning: train only the classification head)
    body_lr_scale: float = 1.0  # learning-rate multiplier for the pretrained body
    early_stop_patience: int = 0  # 0 disables; else stop after N evals without improvement

    def validate(self, n_devices: int = 1) -> None:
        self.model.validate()
        if self.task not in TASKS:
            raise UserError(f"task must be one of {list(TASKS)}, got {self.task!r}")
        for name, allowed in (("dtype", DTYPES), ("attention", ATTENTION), ("remat", REMAT),
                              ("parallel", PARALLEL), ("distributed", DISTRIBUTED),
                              ("nan_policy", NAN_POLICIES)):
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.resume not in ("auto", "never"):
            raise UserError(f"resume must be 'auto' or 'never', got {self.resume!r}")
        if self.freeze not in FREEZE:
            raise UserError(f"freeze must be one of {list(FREEZE)}, got {self.freeze!r}")
        if self.freeze == "body" and self.task != "classify":
            raise UserError("freeze=body needs task=classify (an LM with a frozen body has nothing to train)")
        for name in ("batch_size", "grad_accum", "max_steps", "log_interval", "eval_interval",
                     "eval_steps", "save_interval", "keep"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "decay_steps", "early_stop_patience", "num_processes"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.nan_max_skips < 1:
            raise UserError(f"nan_max_skips must be >= 1, got {self.nan_max_skips}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise UserError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.body_lr_scale < 0:
            raise UserError("weight_decay, grad_clip and body_lr_scale must be >= 0")
        per = n_devices * self.grad_accum
        if self.batch_size % per:
            ok = [b for b in range(per, 4 * per + 1, per)]
            raise UserError(
                f"batch_size={self.batch_size} is not divisible by devices ({n_devices}) x "
                f"grad_accum ({self.grad_accum}) = {per}; try batch_size in {ok}")

    @property
    def total_decay_steps(self) -> int:
        return self.decay_steps or self.max_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        d = dict(d)
        nested = {name: sub(**{k: v for k, v in (d.pop(name, None) or {}).items()
                               if k in _field_names(sub)})
                  for name, sub in _NESTED.items()}
        return cls(**nested, **{k: v for k, v in d.items() if k in _field_names(cls)})


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


_NESTED = {"model": ModelConfig, "mesh": MeshConfig}  # dotted keys: model.n_layer, mesh.fsdp


def valid_keys() -> list[str]:
    keys = [f"{name}.{f.name}" for name, sub in _NESTED.items() for f in dataclasses.fields(sub)]
    keys += [f.name for f in dataclasses.fields(Config) if f.name not in _NESTED]
    return keys


def _coerce(key: str, raw, typ):
    """Turn a command-line string (or a preset's Python value) into the field's type."""
    if not isinstance(raw, str):
        if typ is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        if typ is bool and not isinstance(raw, bool):
            raise UserError(f"{key} expects true/false, got {raw!r}")
        if not isinstance(raw, typ):
            raise UserError(f"{key} expects {typ.__name__}, got {raw!r}")
        return raw
    try:
        if typ is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(float(raw)) if ("e" in raw.lower() and float(raw).is_integer()) else int(raw)
        if typ is float:
            return float(raw)
        return raw
    except ValueError:
        raise UserError(f"{key} expects {typ.__name__}, got {raw!r}") from None


def apply_overrides(cfg: Config, overrides: dict) -> Config:
    """Apply {dotted_key: value} overrides; unknown keys and wrong types are UserErrors."""
    hints = typing.get_type_hints(Config)
    nested_kw = {name: {} for name in _NESTED}
    top_kw = {}
    for key, raw in overrides.items():
        group, _, name = key.partition(".")
        if name and group in _NESTED:
            sub_hints = typing.get_type_hints(_NESTED[group])
            if name not in sub_hints:
                raise UserError(f"unknown key {key!r}; valid keys: {', '.join(valid_keys())}")
            nested_kw[group][name] = _coerce(key, raw, sub_hints[name])
        else:
            if key not in hints or key in _NESTED:
                raise UserError(f"unknown key {key!r}; valid keys: {', '.join(valid_keys())}")
            top_kw[key] = _coerce(key, raw, hints[key])
    nested = {name: dataclasses.replace(getattr(cfg, name), **kw) for name, kw in nested_kw.items()}
    return dataclasses.replace(cfg, **nested, **top_kw)


def parse_cli_overrides(args: list[str]) -> dict:
    out = {}
    for a in args:
        if "=" not in a:
            raise UserError(f"expected key=value, got {a!r}; valid keys: {', '.join(valid_keys())}")
        k, v = a.split("=", 1)
        out[k.strip().removeprefix("--")] = v
    return out


def load_preset(path: str) -> dict:
    """A preset is a Python file defining `overrides = {...}`; a bare name looks in configs/."""
    candidates = [path]
    if not path.endswith(".py"):
        candidates.append(os.path.join("configs", path + ".py"))
    for p in candidates:
        if os.path.isfile(p):
            try:
                ns = runpy.run_path(p)
            except (Exception, SystemExit) as e:  # a broken preset is user input (sys.exit too)
                raise UserError(f"could not read config {p}: {type(e).__name__}: {e}") from None
            ov = ns.get("overrides")
            if not isinstance(ov, dict):
                raise UserError(f"config {p} must define a dict named `overrides`")
            return ov
    raise UserError(f"config file not found: {path}")


def build_config(preset: str | None, cli_args: list[str]) -> Config:
    cfg = Config()
    if preset:
        cfg = apply_overrides(cfg, load_preset(preset))
    return apply_overrides(cfg, parse_cli_overrides(cli_args))
