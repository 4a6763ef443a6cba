"""Write the GPT-2 parity references in tests/data/golden/ (needs torch + transformers).

    PYTHONPATH=. python scripts/make_golden.py

For each model below, transformers' own GPT2LMHeadModel is the reference: it writes the
checkpoint (`save_pretrained`), computes float32 logits for a few token sequences and greedy
continuations (`generate`, do_sample=False, use_cache=True) of prompts of different lengths.
tests/test_hf.py loads the checkpoint through jaxgpt's converter and must reproduce both,
without torch.

Weights are not random draws from torch but `synth_tensor(model, name, shape)`: a function of
the tensor's name built only from PCG64's raw 64-bit stream (fixed by its algorithm, not by a
numpy version) and exact float32 arithmetic, so every machine rebuilds the same bits. That
matters because the odd model keeps GPT-2's real vocabulary (50257 x 96 floats = 19 MB): far
over the 2 MB budget for golden files, so its `model.safetensors` is NOT stored; instead
`manifest.json` lists the exact names and shapes transformers wrote, and the test rebuilds the
file from the recipe (checking a sha256 of the result first, so a recipe change fails loudly
instead of as a logit mismatch). The small model's `model.safetensors` is stored as written.

Every tensor, including LayerNorm scales/biases and all linear biases, gets non-trivial values,
so swapping any two tensors, a missed transpose or a dropped bias changes the logits.

Only a few logit positions/columns are stored (float32, never float16: the test's tolerance
is 1e-4), plus the full-vocabulary logsumexp and argmax at every position, so a wrong column
anywhere in the vocabulary still shows. Greedy references record their smallest top-1/top-2
logit margin; the script refuses references with a margin near float32 noise, since such a
token could legitimately differ between two correct implementations.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "golden")
MIN_MARGIN = 2e-3  # >> the 1e-4 logit tolerance: a greedy token with a smaller gap is fragile

MODELS = {
    # GPT-2's vocabulary with odd sizes everywhere (head_dim 32, 3 heads, 3 layers). Weights
    # are rebuilt from the recipe by the test (see the module docstring).
    "odd": dict(config=dict(n_layer=3, n_head=3, n_embd=96, n_positions=128, vocab_size=50257),
                store_weights=False,
                sequences=[128, 37, 5],  # full context, middle, short
                positions=8, columns=2048,
                prompts=[1, 4, 11, 23], new_tokens=32),
    # A non-default vocabulary (padded to 1024 inside jaxgpt), weights stored as written by HF.
    "vocab1000": dict(config=dict(n_layer=2, n_head=4, n_embd=48, n_positions=64, vocab_size=1000),
                      store_weights=True,
                      sequences=[64, 20, 3],
                      positions=None, columns=None,  # everything: it is small
                      prompts=[2, 7, 16, 30], new_tokens=24),
}

# (name suffix, centre, half-width) of the uniform values per tensor kind; first match wins.
_SCALES = (
    ("ln_1.weight", 1.0, 0.5), ("ln_2.weight", 1.0, 0.5), ("ln_f.weight", 1.0, 0.5),
    ("wte.weight", 0.0, 0.2), ("wpe.weight", 0.0, 0.1),
    ("c_attn.weight", 0.0, 0.2),  # large enough that attention is far from uniform
    (".weight", 0.0, 0.1),  # c_proj, c_fc
    (".bias", 0.0, 0.1),  # all biases, LayerNorm shifts included
)


def synth_tensor(model: str, name: str, shape) -> np.ndarray:
    """Deterministic float32 values for tensor `name` of golden model `model` (see docstring)."""
    seed = int.from_bytes(hashlib.sha256(f"{model}/{name}".encode()).digest()[:8], "little")
    n = int(np.prod(shape, dtype=np.int64))
    bits = np.random.PCG64(seed).random_raw(n)
    # top 24 bits -> integers in [-2^23, 2^23) -> exactly representable floats in [-1, 1)
    u = ((bits >> np.uint64(40)).astype(np.int64) - (1 << 23)).astype(np.float32) * np.float32(2.0 ** -23)
    centre, half = next((c, h) for suffix, c, h in _SCALES if name.endswith(suffix))
    return (np.float32(centre) + np.float32(half) * u).reshape(shape)


def synth_tokens(model: str, what: str, n: int, vocab: int) -> list[int]:
    seed = int.from_bytes(hashlib.sha256(f"{model}/tokens/{what}".encode()).digest()[:8], "little")
    return [int(b % vocab) for b in np.random.PCG64(seed).random_raw(n)]


def tensors_digest(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        a = np.ascontiguousarray(tensors[k], dtype=np.float32)
        h.update(f"{k}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def rebuild_tensors(model: str, manifest: dict) -> dict[str, np.ndarray]:
    """The tensors transformers wrote for `model`, rebuilt from the manifest and the recipe."""
    return {name: synth_tensor(model, name, tuple(shape)) for name, shape in manifest["tensors"]}


def _columns(model: str, vocab: int, k: int | None) -> np.ndarray:
    if k is None or k >= vocab:
        return np.arange(vocab)
    picks = set(synth_tokens(model, "columns", 4 * k, vocab)) | {0, 1, vocab - 2, vocab - 1}
    return np.array(sorted(picks)[:k - 4] + [0, 1, vocab - 2, vocab - 1]).astype(np.int64)


def _positions(model: str, T: int, k: int | None) -> np.ndarray:
    if k is None or k >= T:
        return np.arange(T)
    picks = sorted(set(synth_tokens(model, f"positions{T}", 4 * k, T)) - {0, T - 1})[:k - 2]
    return np.array(sorted([0, T - 1] + picks), np.int64)


def make(model: str, spec: dict) -> dict:
    import torch
    from safetensors import safe_open
    from transformers import GPT2Config, GPT2LMHeadModel

    out = os.path.join(GOLDEN, model)
    os.makedirs(out, exist_ok=True)
    # bos/eos None: generation must not stop early at token 50256 (jaxgpt's runs with eos_id=None)
    config = GPT2Config(**spec["config"], bos_token_id=None, eos_token_id=None)
    hf = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # tied lm_head is the same Parameter as wte
            p.copy_(torch.from_numpy(synth_tensor(model, name, tuple(p.shape))))
    tmp = os.path.join(out, ".hf_tmp")
    hf.save_pretrained(tmp, safe_serialization=True)
    st_path = os.path.join(tmp, "model.safetensors")
    with safe_open(st_path, framework="numpy") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
    manifest = {"tensors": sorted([k, list(v.shape)] for k, v in written.items())}
    rebuilt = rebuild_tensors(model, manifest)
    for k, v in written.items():  # the recipe must reproduce the file bit for bit
        assert np.array_equal(rebuilt[k], v), f"recipe does not reproduce {k}"
    manifest["sha256"] = tensors_digest(rebuilt)
    os.replace(os.path.join(tmp, "config.json"), os.path.join(out, "config.json"))
    if spec["store_weights"]:
        os.replace(st_path, os.path.join(out, "model.safetensors"))
        os.chmod(os.path.join(out, "model.safetensors"), 0o644)
    for f in os.listdir(tmp):
        os.remove(os.path.join(tmp, f))
    os.rmdir(tmp)
    with open(os.path.join(out, "manifest.json"), "w") as f:  # one tensor per line: diffable
        rows = ",\n  ".join(json.dumps(t) for t in manifest["tensors"])
        f.write(f'{{"sha256": "{manifest["sha256"]}",\n "tensors": [\n  {rows}]}}\n')

    V = config.vocab_size
    cols = _columns(model, V, spec["columns"])
    arrays = {"columns": cols}
    with torch.no_grad():
        for i, T in enumerate(spec["sequences"]):
            toks = synth_tokens(model, f"seq{i}", T, V)
            logits = hf(torch.tensor([toks])).logits[0].double().numpy()  # (T, V), computed in f32
            pos = _positions(model, T, spec["positions"])
            arrays[f"tokens_{i}"] = np.array(toks, np.int64)
            arrays[f"positions_{i}"] = pos
            arrays[f"logits_{i}"] = logits[pos][:, cols].astype(np.float32)
            m = logits.max(-1, keepdims=True)
            arrays[f"lse_{i}"] = (m[:, 0] + np.log(np.exp(logits - m).sum(-1))).astype(np.float32)
            arrays[f"argmax_{i}"] = logits.argmax(-1).astype(np.int64)
    np.savez(os.path.join(out, "logits.npz"), **arrays)

    prompts, conts, margins = [], [], []
    for j, P in enumerate(spec["prompts"]):
        prompt = synth_tokens(model, f"prompt{j}", P, V)
        with torch.no_grad():
            res = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, P, dtype=torch.long),
                              do_sample=False, use_cache=True, max_new_tokens=spec["new_tokens"],
                              min_new_tokens=spec["new_tokens"], eos_token_id=None, pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True)
        cont = res.sequences[0, P:].tolist()
        assert len(cont) == spec["new_tokens"]
        top2 = torch.stack(res.scores)[:, 0].topk(2, dim=-1).values
        margin = float((top2[:, 0] - top2[:, 1]).min())
        if margin < MIN_MARGIN:
            sys.exit(f"{model}: prompt {j} has a greedy margin {margin:.2e} < {MIN_MARGIN}; "
                     "change the prompt seed")
        prompts.append(prompt)
        conts.append(cont)
        margins.append(margin)
    with open(os.path.join(out, "greedy.json"), "w") as f:
        json.dump({"prompts": prompts, "continuations": conts, "min_margins": margins}, f)
    return {"model": model, "min_margin": min(margins),
            "logit_absmax": float(max(np.abs(arrays[f"logits_{i}"]).max()
                                      for i in range(len(spec["sequences"]))))}


def main() -> None:
    import torch
    import transformers

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(GOLDEN, exist_ok=True)
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "models": []}
    for model, spec in MODELS.items():
        r = make(model, spec)
        info["models"].append(r)
        print(json.dumps(r))
    with open(os.path.join(GOLDEN, "README.json"), "w") as f:
        json.dump(info | {"written_by": "scripts/make_golden.py"}, f, indent=1)
    total = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(GOLDEN) for fn in fns)
    print(f"golden files: {total / 1e6:.2f} MB")
    assert total < 2e6, "golden files must stay under 2 MB"


if __name__ == "__main__":
    main()
