"""GPT-2 interop: Hugging Face GPT-2 checkpoints in and out, and the weights for `init_from=gpt2`.

Name mapping (HF → jaxgpt; `L` is the layer, stacked on the leading axis of `model.blocks`):

    wte.weight (V, D)                → wte (Vp, D); rows V..Vp-1 are zero padding (never used:
                                       logits are cut to the real vocabulary)
    wpe.weight (P, D)                → wpe
    h.L.ln_1.weight / .bias          → blocks.ln1_scale[L] / blocks.ln1_bias[L]
    h.L.attn.c_attn.weight / .bias   → blocks.w_qkv[L] (D, 3D) / blocks.b_qkv[L]
    h.L.attn.c_proj.weight / .bias   → blocks.w_attn_out[L] / blocks.b_attn_out[L]
    h.L.ln_2.weight / .bias          → blocks.ln2_scale[L] / blocks.ln2_bias[L]
    h.L.mlp.c_fc.weight / .bias      → blocks.w_fc[L] / blocks.b_fc[L]
    h.L.mlp.c_proj.weight / .bias    → blocks.w_mlp_out[L] / blocks.b_mlp_out[L]
    ln_f.weight / .bias              → ln_f_scale / ln_f_bias
    lm_head.weight                   → none: tied to wte (accepted only when equal to it)

HF's `Conv1D` stores weights (in, out) exactly like jaxgpt, and both split the fused qkv output
as [q | k | v] then heads as (H, K), so no tensor is transposed or permuted. Names may carry a
`transformer.` prefix (GPT2LMHeadModel) or not (GPT2Model, the original OpenAI files); the
causal-mask buffers `attn.bias` / `attn.masked_bias` of older files are ignored; any other
tensor (e.g. a classification `score.weight`) is refused rather than silently dropped.

Config fields the architecture cannot honour are refused (see `model_config_from_hf`). One
is accepted with a caveat: `activation_function="gelu"` is HF's exact erf GELU while jaxgpt
computes the tanh approximation (`gelu_new`); the two differ by < 5e-4 per activation, so such a
model's logits match HF's only to about 1e-3 (measured 6e-4..1e-3 on random models up to GPT-2
124M's shape), not 1e-4; a warning says so.

Files are read with safetensors' numpy API (sharded `model.safetensors.index.json` too). A
`pytorch_model.bin` is read only when torch is installed and only through
`torch.load(weights_only=True)`, which refuses pickles that would run code.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import tempfile
import warnings

import numpy as np

from jaxgpt.config import Config, ModelConfig
from jaxgpt.errors import UserError

PRETRAINED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
LN_EPS = 1e-5
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the same tanh approximation
EOT_IDS = {"gpt2": 50256, "byte": 256}  # the tokenizers' <|endoftext|> ids (bos/eos in config.json)
_TOKENIZER_KEY = "jaxgpt_tokenizer"  # extra config.json key: keeps a byte-level model's tokenizer

_BLOCK_MAP = {  # HF name after "h.L." → jaxgpt `blocks` param
    "ln_1.weight": "ln1_scale", "ln_1.bias": "ln1_bias",
    "attn.c_attn.weight": "w_qkv", "attn.c_attn.bias": "b_qkv",
    "attn.c_proj.weight": "w_attn_out", "attn.c_proj.bias": "b_attn_out",
    "ln_2.weight": "ln2_scale", "ln_2.bias": "ln2_bias",
    "mlp.c_fc.weight": "w_fc", "mlp.c_fc.bias": "b_fc",
    "mlp.c_proj.weight": "w_mlp_out", "mlp.c_proj.bias": "b_mlp_out",
}
_TOP_MAP = {"wte.weight": "wte", "wpe.weight": "wpe", "ln_f.weight": "ln_f_scale",
            "ln_f.bias": "ln_f_bias"}
_MASK_BUFFERS = ("attn.bias", "attn.masked_bias")  # per-layer constants in older HF files


# ----------------------------------------------------------------------------- config
def model_config_from_hf(hf: dict) -> tuple[ModelConfig, list[str]]:
    """(ModelConfig, warnings) for an HF GPT-2 `config.json` dict; UserError if unsupported."""
    if not isinstance(hf, dict):
        raise UserError("config.json must hold a JSON object")
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise UserError(f"model_type={model_type!r} is not supported: only GPT-2 (model_type 'gpt2') "
                        "checkpoints can be converted")
    notes = []
    act = hf.get("activation_function", "gelu_new")
    if act == "gelu":
        notes.append("activation_function='gelu' (exact erf GELU) is run with the tanh "
                     "approximation: logits differ from HF's by up to ~1e-3")
    elif act not in TANH_GELUS:
        raise UserError(f"activation_function={act!r} is not supported (jaxgpt uses the tanh GELU; "
                        f"accepted: {', '.join(TANH_GELUS + ('gelu',))})")
    eps = hf.get("layer_norm_epsilon", LN_EPS)
    if not isinstance(eps, (int, float)) or not math.isclose(eps, LN_EPS, rel_tol=1e-6):
        raise UserError(f"layer_norm_epsilon={eps!r} is not supported (jaxgpt's LayerNorm uses {LN_EPS})")
    for flag, why in (("scale_attn_by_inverse_layer_idx", "per-layer attention scaling"),
                      ("add_cross_attention", "cross-attention")):
        if hf.get(flag):
            raise UserError(f"{flag}=true is not supported: jaxgpt's GPT-2 has no {why}")
    if hf.get("scale_attn_weights", True) is False:
        raise UserError("scale_attn_weights=false is not supported: jaxgpt always scales "
                        "attention scores by 1/sqrt(head_dim)")
    # reorder_and_upcast_attn only changes where HF upcasts to float32; jaxgpt's scores and
    # softmax are float32 already, so it is accepted.
    sizes = {}
    for key, alt in (("vocab_size", None), ("n_positions", "n_ctx"), ("n_embd", None),
                     ("n_layer", None), ("n_head", None)):
        v = hf.get(key, hf.get(alt) if alt else None)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"config.json: {key} must be a positive integer, got {v!r}")
        sizes[key] = v
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * sizes["n_embd"]:
        raise UserError(f"n_inner={n_inner} is not supported: jaxgpt's MLP width is "
                        f"4*n_embd={4 * sizes['n_embd']}")
    mc = ModelConfig(vocab_size=sizes["vocab_size"], block_size=sizes["n_positions"],
                     n_layer=sizes["n_layer"], n_head=sizes["n_head"], n_embd=sizes["n_embd"],
                     dropout=0.0, bias=True)  # dropout 0: a converted model is for inference
    mc.validate()
    return mc, notes


def hf_config_from(mc: ModelConfig, tokenizer: str = "gpt2") -> dict:
    """The HF GPT-2 `config.json` dict for a jaxgpt model config (GPT2LMHeadModel, tied head)."""
    eot = EOT_IDS.get(tokenizer)
    eot = eot if eot is not None and eot < mc.vocab_size else None
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": mc.vocab_size, "n_positions": mc.block_size, "n_ctx": mc.block_size,
        "n_embd": mc.n_embd, "n_layer": mc.n_layer, "n_head": mc.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": LN_EPS,
        "resid_pdrop": mc.dropout, "embd_pdrop": mc.dropout, "attn_pdrop": mc.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "use_cache": True, "tie_word_embeddings": True,
        "bos_token_id": eot, "eos_token_id": eot, _TOKENIZER_KEY: tokenizer,
    }


def _tokenizer_for(hf: dict) -> str:
    name = hf.get(_TOKENIZER_KEY, "gpt2")
    return name if name in EOT_IDS else "gpt2"


# ----------------------------------------------------------------------------- reading tensors
class _Tensors:
    """Tensors of an HF folder by normalised name (no `transformer.` prefix), read lazily as
    float32 numpy arrays so a large model is held once, not twice."""

    def __init__(self, names: dict[str, str], get, source: str):
        self._raw = names  # normalised → name in the file
        self._get = get
        self.source = source

    def names(self) -> set[str]:
        return set(self._raw)

    def get(self, name: str) -> np.ndarray:
        arr = np.asarray(self._get(self._raw[name]))
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
            raise UserError(f"{self.source}: tensor {self._raw[name]} has dtype {arr.dtype}, "
                            "expected floating point")
        return arr.astype(np.float32, copy=False)


def _normalise(raw_names, source: str) -> dict[str, str]:
    out = {}
    for raw in raw_names:
        name = raw.removeprefix("transformer.")
        if name in out:
            raise UserError(f"{source}: tensor {name} appears twice ({out[name]} and {raw})")
        out[name] = raw
    return out


def _open_safetensors(files: list[str], source: str) -> _Tensors:
    from safetensors import safe_open

    handles, where = [], {}
    try:
        for path in files:
            h = safe_open(path, framework="numpy")
            handles.append(h)
            for k in h.keys():
                where[k] = h
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"could not read {source}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    return _Tensors(_normalise(where, source), lambda raw: where[raw].get_tensor(raw), source)


def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _open_torch_bin(path: str) -> _Tensors:
    torch = _import_torch()
    if torch is None:
        raise UserError(f"{path} is a PyTorch pickle: install torch (pip install torch) to read it, "
                        "or provide model.safetensors instead")
    try:
        # weights_only=True: the unpickler accepts tensors and plain containers only, so a
        # malicious file cannot run code (never fall back to a full unpickle).
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"refused to load {path}: not a plain weights file "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a flat dict of tensors (a state_dict)")
    get = lambda raw: state[raw].detach().to(torch.float32).numpy()  # noqa: E731
    return _Tensors(_normalise(state, path), get, path)


def _open_weights(hf_dir: str) -> _Tensors:
    single = os.path.join(hf_dir, "model.safetensors")
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    pickle = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.isfile(single):
        return _open_safetensors([single], single)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"could not read {index}: {type(e).__name__}: {e}") from None
        paths = [os.path.join(hf_dir, s) for s in shards]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise UserError(f"{index} names missing shard(s): {', '.join(missing[:3])}")
        return _open_safetensors(paths, index)
    if os.path.isfile(pickle):
        return _open_torch_bin(pickle)
    raise UserError(f"no weights in {hf_dir}: expected model.safetensors "
                    "(or model.safetensors.index.json, or pytorch_model.bin with torch installed)")


def read_hf_config(hf_dir: str) -> dict:
    if not os.path.isdir(hf_dir):
        raise UserError(f"Hugging Face model folder not found: {hf_dir}")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"no config.json in {hf_dir} (expected a Hugging Face GPT-2 folder)")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"could not read {path}: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------- HF → jaxgpt
def params_from_hf(tensors: _Tensors, mc: ModelConfig, tie_word_embeddings: bool = True) -> dict:
    """jaxgpt's param dict (the layout of `checkpoint.model_params`) from HF GPT-2 tensors."""
    L, D, V = mc.n_layer, mc.n_embd, mc.vocab_size
    expect_top = {"wte.weight": (V, D), "wpe.weight": (mc.block_size, D),
                  "ln_f.weight": (D,), "ln_f.bias": (D,)}
    block_shapes = {"ln_1.weight": (D,), "ln_1.bias": (D,),
                    "attn.c_attn.weight": (D, 3 * D), "attn.c_attn.bias": (3 * D,),
                    "attn.c_proj.weight": (D, D), "attn.c_proj.bias": (D,),
                    "ln_2.weight": (D,), "ln_2.bias": (D,),
                    "mlp.c_fc.weight": (D, 4 * D), "mlp.c_fc.bias": (4 * D,),
                    "mlp.c_proj.weight": (4 * D, D), "mlp.c_proj.bias": (D,)}
    names = tensors.names()
    known = set(expect_top) | {"lm_head.weight"}
    known |= {f"h.{i}.{s}" for i in range(L) for s in list(block_shapes) + list(_MASK_BUFFERS)}
    unexpected = sorted(names - known)
    if unexpected:
        raise UserError(f"{tensors.source}: unexpected tensor(s) {', '.join(unexpected[:4])}"
                        f"{' ...' if len(unexpected) > 4 else ''} — not a GPT-2 LM checkpoint with "
                        f"n_layer={L} (classification heads and other architectures are not supported)")

    def fetch(name, shape):
        if name not in names:
            raise UserError(f"{tensors.source}: missing tensor {name}")
        arr = tensors.get(name)
        if arr.shape != shape:
            raise UserError(f"{tensors.source}: tensor {name} has shape {arr.shape}, "
                            f"config.json implies {shape}")
        return arr

    params = {"blocks": {}}
    wte = fetch("wte.weight", (V, D))
    padded = np.zeros((mc.padded_vocab, D), np.float32)  # pad rows: never looked up or predicted
    padded[:V] = wte
    params["wte"] = padded
    params["wpe"] = fetch("wpe.weight", (mc.block_size, D))
    params["ln_f_scale"] = fetch("ln_f.weight", (D,))
    params["ln_f_bias"] = fetch("ln_f.bias", (D,))
    if "lm_head.weight" in names:
        if not np.array_equal(fetch("lm_head.weight", (V, D)), wte):
            raise UserError(f"{tensors.source}: lm_head.weight differs from wte.weight; jaxgpt "
                            "ties the LM head to the token embedding, so an untied head cannot be converted")
    elif not tie_word_embeddings:
        raise UserError(f"{tensors.source}: tie_word_embeddings=false but there is no "
                        "lm_head.weight; jaxgpt needs the head tied to wte")
    for suffix, ours in _BLOCK_MAP.items():
        shape = block_shapes[suffix]
        stacked = np.empty((L,) + shape, np.float32)
        for i in range(L):
            stacked[i] = fetch(f"h.{i}.{suffix}", shape)
        params["blocks"][ours] = stacked
    return params


def _model_from_params(mc: ModelConfig, params: dict):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxgpt.model import abstract_model

    model = abstract_model(mc)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    return model


def read_hf(hf_dir: str):
    """(model, Config, tokenizer name, warnings) of an HF GPT-2 folder; UserError if unsupported."""
    hf = read_hf_config(hf_dir)
    mc, notes = model_config_from_hf(hf)
    tensors = _open_weights(hf_dir)
    params = params_from_hf(tensors, mc, tie_word_embeddings=hf.get("tie_word_embeddings", True) is not False)
    cfg = Config(model=mc, init_from=os.path.abspath(hf_dir))
    return _model_from_params(mc, params), cfg, _tokenizer_for(hf), notes


def _warn(notes: list[str]) -> None:
    for n in notes:
        warnings.warn(n, UserWarning, stacklevel=3)


def load_hf(hf_dir: str):
    """Load an HF GPT-2 folder (config.json + model.safetensors): returns (model, tokenizer)."""
    from jaxgpt.tokenizer import get_tokenizer

    model, _cfg, tok, notes = read_hf(hf_dir)
    _warn(notes)
    return model, get_tokenizer(tok)


# ----------------------------------------------------------------------------- pretrained names
def hub_cache_dir() -> str:
    """The Hugging Face hub cache folder, resolved the way huggingface_hub resolves it."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "huggingface", "hub")


def _repo_ids(name: str) -> list[str]:
    return [f"openai-community/{name}", name]  # current name first, then the legacy one


def _has_weights(d: str) -> bool:
    return os.path.isfile(os.path.join(d, "config.json")) and (
        os.path.isfile(os.path.join(d, "model.safetensors"))
        or os.path.isfile(os.path.join(d, "model.safetensors.index.json")))


def find_cached(name: str) -> str | None:
    """A local snapshot folder of `name` (e.g. "gpt2") with config + safetensors, if cached."""
    cache = hub_cache_dir()
    for repo in _repo_ids(name):
        root = os.path.join(cache, "models--" + repo.replace("/", "--"))
        snaps = os.path.join(root, "snapshots")
        if not os.path.isdir(snaps):
            continue
        candidates = []
        try:  # the revision `main` points at comes first
            with open(os.path.join(root, "refs", "main")) as f:
                candidates.append(os.path.join(snaps, f.read().strip()))
        except OSError:
            pass
        others = [os.path.join(snaps, s) for s in os.listdir(snaps)]
        candidates += sorted(others, key=lambda p: os.path.getmtime(p), reverse=True)
        for c in candidates:
            if _has_weights(c):
                return c
    return None


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _import_hub_ok() -> bool:
    return importlib.util.find_spec("huggingface_hub") is not None


def _download(repo_id: str) -> str:
    """Fetch config.json + model.safetensors through huggingface_hub (the `hf` extra)."""
    import huggingface_hub

    return huggingface_hub.snapshot_download(repo_id=repo_id,
                                             allow_patterns=["config.json", "model.safetensors"])


def resolve_pretrained(name: str) -> str:
    """Folder holding the HF files of a GPT-2 name: the local cache, else a download when
    huggingface_hub is installed and we are online; else a UserError that says what to do."""
    found = find_cached(name)
    if found:
        return found
    cache = hub_cache_dir()
    where = " or ".join(os.path.join(cache, "models--" + r.replace("/", "--"), "snapshots", "<rev>")
                        for r in _repo_ids(name))
    how = (f"get them online with `pip install 'jaxgpt[hf]'` (then jaxgpt downloads them), or "
           f"`hf download openai-community/{name} config.json model.safetensors`, or pass a folder "
           "holding config.json + model.safetensors")
    hub_installed = _import_hub_ok()
    if hub_installed and not _offline():
        try:
            path = _download(f"openai-community/{name}")
        except Exception as e:  # no network, rate limit, ...: any type from the hub client
            raise UserError(f"GPT-2 weights {name!r} are not in the local Hugging Face cache "
                            f"(expected config.json + model.safetensors in {where}) and the download "
                            f"failed ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                            f"{how}") from None
        if _has_weights(path):
            return path
        raise UserError(f"downloaded {name!r} to {path} but config.json / model.safetensors are missing")
    reason = "HF_HUB_OFFLINE is set" if hub_installed else "huggingface_hub is not installed"
    raise UserError(f"GPT-2 weights {name!r} are not in the local Hugging Face cache (expected "
                    f"config.json + model.safetensors in {where}) and {reason}; {how}")


def load_pretrained(name_or_dir: str):
    """Weights for `init_from`: a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or an HF
    folder. Returns (model, Config) with the architecture in `Config.model` (dropout 0)."""
    if name_or_dir in PRETRAINED:
        hf_dir = resolve_pretrained(name_or_dir)
    elif os.path.isdir(name_or_dir):
        hf_dir = name_or_dir
    else:
        raise UserError(f"unknown pretrained model {name_or_dir!r}: use one of "
                        f"{', '.join(PRETRAINED)} or a folder with config.json + model.safetensors")
    model, cfg, _tok, notes = read_hf(hf_dir)
    _warn(notes)
    return model, dataclasses.replace(cfg, init_from=name_or_dir)


# ----------------------------------------------------------------------------- jaxgpt → HF
def params_to_hf(params: dict, mc: ModelConfig) -> dict[str, np.ndarray]:
    """HF GPT2LMHeadModel tensors (names with `transformer.`, head tied so no lm_head.weight)
    from jaxgpt params; the padded vocabulary rows are dropped."""
    out = {
        "transformer.wte.weight": np.asarray(params["wte"])[:mc.vocab_size],
        "transformer.wpe.weight": np.asarray(params["wpe"]),
        "transformer.ln_f.weight": np.asarray(params["ln_f_scale"]),
        "transformer.ln_f.bias": np.asarray(params["ln_f_bias"]),
    }
    for suffix, ours in _BLOCK_MAP.items():
        stacked = np.asarray(params["blocks"][ours])
        for i in range(mc.n_layer):
            out[f"transformer.h.{i}.{suffix}"] = stacked[i]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


# ----------------------------------------------------------------------------- conversion
def _check_out(out_dir: str) -> None:
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise UserError(f"--out {out_dir} exists and is not a folder")
        if os.listdir(out_dir):
            raise UserError(f"--out {out_dir} exists and is not empty; refusing to overwrite it")


def _atomic_write(out_dir: str, write) -> None:
    """Run write(tmp_dir) in a sibling temp folder, then rename it to out_dir: a failure (or
    Ctrl-C) leaves no half-written output, only nothing."""
    _check_out(out_dir)
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        write(tmp)
        _check_out(out_dir)  # someone may have written there meanwhile
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked): rename cannot replace a folder portably
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert_from_hf(hf_dir: str, out_dir: str) -> tuple[Config, list[str]]:
    """HF GPT-2 folder → jaxgpt checkpoint folder (step 0). Returns (Config, warnings)."""
    from jaxgpt.checkpoint import save_model_checkpoint

    _check_out(out_dir)
    model, cfg, tok, notes = read_hf(hf_dir)
    meta = {"tokenizer": tok, "converted_from": os.path.abspath(hf_dir)}
    _atomic_write(out_dir, lambda tmp: save_model_checkpoint(tmp, model, cfg, meta))
    return cfg, notes


def convert_to_hf(ckpt_dir: str, out_dir: str, step: int | None = None) -> Config:
    """jaxgpt checkpoint → HF folder (config.json + model.safetensors) for GPT2LMHeadModel."""
    from safetensors.numpy import save_file

    from jaxgpt.checkpoint import load_model, model_params

    _check_out(out_dir)
    model, cfg, meta = load_model(ckpt_dir, step)
    mc = cfg.model
    if mc.n_classes or cfg.task == "classify":
        raise UserError(f"{ckpt_dir} is a classification checkpoint (n_classes={mc.n_classes}); "
                        "HF GPT2LMHeadModel has no classification head, so it cannot be exported")
    if not mc.bias:
        raise UserError(f"{ckpt_dir} was trained with model.bias=false; HF GPT-2 always has "
                        "biases, so it cannot be exported")
    tensors = params_to_hf(model_params(model), mc)
    hf_cfg = hf_config_from(mc, meta.get("tokenizer", "gpt2"))

    def write(tmp):
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
            f.write("\n")

    _atomic_write(out_dir, write)
    return cfg
