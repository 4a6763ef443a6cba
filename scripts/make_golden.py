"""Write the GPT-2 parity references in tests/data/golden/ (needs torch + transformers).

    PYTHONPATH=. python scripts/make_golden.py               # everything
    PYTHONPATH=. python scripts/make_golden.py --beams-only  # only <model>/beams.json

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

Beam search (`beams.json`, issue #15): transformers' generate(num_beams=K, do_sample=False) for
prompts of 1, 4 and 11 tokens, each generated alone, K = 2, 3, 5, 16 new tokens, without EOS
(eos_token_id=None passed explicitly: transformers would otherwise take the model's generation
config) and with an EOS that the beams really produce (the most frequent new token of the
group's EOS-free search), length_penalty 0.5 / 1.0 / 2.0, early_stopping False / True / "never",
num_return_sequences cycling through K, 1, 2. Shorter finished sequences come back padded with
pad_token_id = vocab_size - 1 (passed explicitly and nonzero: transformers pads with the EOS id
when pad_token_id is 0 or unset); each case stores the kwargs, the new tokens as returned, each
sequence's true length, `sequences_scores` and the number of decoding steps transformers ran.
docs/beam_search_semantics.md describes the algorithm; tests/beam_reference.py implements it
in numpy, and this script requires it to reproduce every stored case.

A beam reference is fragile where a decision rests on a near-tie, so each case is kept only if
  1. the numpy reference, fed the float32 log-probabilities of the same model, reproduces
     transformers' sequences, step count and scores (to 1e-5); a robust case where it does not is
     a bug in the reference, and the script stops;
  2. every decision of the search has a gap of at least MIN_BEAM_MARGIN, measured by the
     reference in summed log-probability units (nats): the K-th/(K+1)-th continuing candidate,
     each EOS candidate against the top-K boundary that decides whether it is finished, the
     order and membership of the finished list (length-normalised gaps scaled back by
     length ** length_penalty), and each early-stopping comparison. 2e-3 nats is 20x the 1e-4
     logit tolerance of the parity tests and far above the ~1e-6 float32 noise between two
     correct implementations, over 16 accumulated steps;
  3. transformers run on the float64 model (model.double()) returns the same sequences.
The cases of one (prompt length, K) group share their prompt and EOS id; when a case of a group
is fragile, or no sequence of the group ends with EOS before the last step, the whole group is
redrawn with the next prompt seed (the seed index is stored as `attempt`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "golden")
MIN_MARGIN = 2e-3  # >> the 1e-4 logit tolerance: a greedy token with a smaller gap is fragile
MIN_BEAM_MARGIN = 2e-3  # smallest decision gap of a beam reference, in summed log-prob units
BEAMS = dict(
    prompt_lengths=[1, 4, 11], num_beams=[2, 3, 5], new_tokens=16, attempts=10,
    # (length_penalty, early_stopping) of the cases of one group, with and without EOS
    eos_variants=[(lp, es) for lp in (1.0, 0.5, 2.0) for es in (False, True, "never")],
    no_eos_variants=[(1.0, False), (2.0, True)],
)

MODELS = {
    # GPT-2's vocabulary with odd sizes everywhere (head_dim 32, 3 heads, 3 layers). Weights
    # are rebuilt from the recipe by the test (see the module docstring).
    "odd": dict(config=dict(n_layer=3, n_head=3, n_embd=96, n_positions=128, vocab_size=50257),
                store_weights=False,
                sequences=[128, 37, 5],  # full context, middle, short
                positions=8, columns=2048,
                prompts=[1, 4, 11, 23], new_tokens=32,
                # found by search: early_stopping False stops at step 6 with a 6- and a 2-token
                # finished beam, "never" goes on to two better 16-token ones
                beam_extra=[dict(seed="search1_11", length=11, num_beams=2, eos=34619)]),
    # A non-default vocabulary (padded to 1024 inside jaxgpt), weights stored as written by HF.
    "vocab1000": dict(config=dict(n_layer=2, n_head=4, n_embd=48, n_positions=64, vocab_size=1000),
                      store_weights=True,
                      sequences=[64, 20, 3],
                      positions=None, columns=None,  # everything: it is small
                      prompts=[2, 7, 16, 30], new_tokens=24,
                      # found by search: early_stopping False stops at step 9 with two
                      # finished 8- and 9-token beams, "never" goes on to better 16-token ones
                      beam_extra=[dict(seed="search3_1", length=1, num_beams=2, eos=964)]),
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


def hf_model(model: str, spec: dict):
    """transformers' GPT2LMHeadModel for golden model `model`, weights from the recipe."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    # bos/eos None: generation must not stop early at token 50256 (jaxgpt's runs with eos_id=None)
    config = GPT2Config(**spec["config"], bos_token_id=None, eos_token_id=None)
    hf = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # tied lm_head is the same Parameter as wte
            p.copy_(torch.from_numpy(synth_tensor(model, name, tuple(p.shape))))
    return hf


def make(model: str, spec: dict) -> dict:
    import torch
    from safetensors import safe_open

    out = os.path.join(GOLDEN, model)
    os.makedirs(out, exist_ok=True)
    hf = hf_model(model, spec)
    config = hf.config
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


# ----------------------------------------------------------------------------- beam search
def _beam_reference():
    """tests/beam_reference.py, the numpy oracle every beam case must agree with."""
    import importlib.util

    path = os.path.join(os.path.dirname(GOLDEN), "..", "beam_reference.py")
    spec = importlib.util.spec_from_file_location("beam_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _beam_case(hf, hf64, ref, prompt: list[int], kwargs: dict) -> dict | None:
    """One beam reference from transformers, checked (see docstring); None when fragile."""
    import torch

    def run(m):
        with torch.no_grad():
            mask = torch.ones(1, len(prompt), dtype=torch.long)
            return m.generate(torch.tensor([prompt]), attention_mask=mask, do_sample=False, use_cache=True,
                              output_scores=True, return_dict_in_generate=True, **kwargs)

    def logprobs(seqs):  # full forward, no cache: float32 log_softmax over the whole vocabulary
        with torch.no_grad():
            return torch.log_softmax(hf(torch.tensor(seqs)).logits[:, -1].float(), -1).double().numpy()

    P, eos = len(prompt), kwargs["eos_token_id"]
    res = run(hf)
    seqs = res.sequences[:, P:].tolist()
    scores = res.sequences_scores.tolist()
    lengths = [s.index(eos) + 1 if eos in s else len(s) for s in seqs]
    # transformers' own record of each sequence's length: its beam indices, -1 past the end
    assert lengths == (res.beam_indices >= 0).sum(-1).tolist(), (lengths, res.beam_indices)
    trace = {}
    r_seqs, r_scores = ref.beam_search_reference(
        logprobs, prompt, kwargs["num_beams"], kwargs["max_new_tokens"], eos, kwargs["length_penalty"],
        kwargs["early_stopping"], kwargs["num_return_sequences"], trace=trace)
    margin = ref.min_margin(trace)
    if margin < MIN_BEAM_MARGIN:
        return None
    if run(hf64).sequences[:, P:].tolist() != seqs:
        return None
    if (r_seqs != [s[:n] for s, n in zip(seqs, lengths)] or trace["steps"] != len(res.scores)
            or not np.allclose(r_scores, scores, rtol=0, atol=1e-5)):
        sys.exit(f"tests/beam_reference.py disagrees with transformers on a robust case: prompt {prompt} "
                 f"{kwargs}: {seqs} {scores} {len(res.scores)} steps vs {r_seqs} {r_scores.tolist()} "
                 f"{trace['steps']} steps")
    return {"prompt": prompt, "kwargs": kwargs, "sequences": seqs, "lengths": lengths,
            "sequences_scores": scores, "steps": len(res.scores), "min_margin": margin}


def _beam_group(model, hf, hf64, ref, length: int, K: int, N: int, pad: int, variants) -> list[dict]:
    """The cases of one (prompt length, K) group (see docstring), redrawn until all are robust."""
    from collections import Counter

    V = hf.config.vocab_size
    for attempt in range(BEAMS["attempts"]):
        prompt = synth_tokens(model, f"beam{length}x{K}/{attempt}", length, V)
        plain = _beam_case(hf, hf64, ref, prompt, dict(
            num_beams=K, max_new_tokens=N, eos_token_id=None, length_penalty=1.0, early_stopping=False,
            num_return_sequences=K, pad_token_id=pad))
        if plain is None:
            continue
        eos = Counter(t for s in plain["sequences"] for t in s).most_common(1)[0][0]
        if eos == pad:
            continue
        cases = []
        for i, (e, lp, es) in enumerate([(None, lp, es) for lp, es in variants[0]]
                                        + [(eos, lp, es) for lp, es in variants[1]]):
            c = _beam_case(hf, hf64, ref, prompt, dict(
                num_beams=K, max_new_tokens=N, eos_token_id=e, length_penalty=lp, early_stopping=es,
                num_return_sequences=min(K, (K, 1, 2)[i % 3]), pad_token_id=pad))
            if c is None:
                break
            cases.append(c | {"attempt": attempt})
        else:
            if any(n < N for c in cases for n in c["lengths"]):
                return cases
        print(f"{model}: beam group {length}x{K} attempt {attempt} is fragile or never ends with EOS")
    sys.exit(f"{model}: no robust beam group {length}x{K} in {BEAMS['attempts']} attempts")


def make_beams(model: str, spec: dict) -> dict:
    """Write <model>/beams.json (see docstring); returns a summary."""
    import copy

    import torch
    import transformers

    ref = _beam_reference()
    hf = hf_model(model, spec)
    hf64 = copy.deepcopy(hf).double()
    V, N = hf.config.vocab_size, BEAMS["new_tokens"]
    pad = V - 1
    cases = []
    for length in BEAMS["prompt_lengths"]:
        for K in BEAMS["num_beams"]:
            cases += _beam_group(model, hf, hf64, ref, length, K, N, pad,
                                 (BEAMS["no_eos_variants"], BEAMS["eos_variants"]))
    for x in spec["beam_extra"]:  # a fixed prompt and EOS, every early_stopping mode
        prompt = synth_tokens(model, x["seed"], x["length"], V)
        got = {}
        for es in (False, True, "never"):
            c = _beam_case(hf, hf64, ref, prompt, dict(
                num_beams=x["num_beams"], max_new_tokens=N, eos_token_id=x["eos"], length_penalty=1.0,
                early_stopping=es, num_return_sequences=x["num_beams"], pad_token_id=pad))
            if c is None:
                sys.exit(f"{model}: extra beam case {x} early_stopping={es} is fragile")
            got[es] = c["sequences"]
            cases.append(c | {"extra": x["seed"]})
        if got[False] == got["never"]:
            sys.exit(f"{model}: extra beam case {x} no longer tells early_stopping False from 'never'")

    def best(c):  # the best hypothesis, unpadded (the padded width depends on what is returned)
        return c["sequences"][0][:c["lengths"][0]], c["sequences_scores"][0]

    def differs(a, b):  # same prompt, K, EOS and penalty; other early_stopping, other best result
        seen = {(tuple(c["prompt"]), c["kwargs"]["num_beams"], c["kwargs"]["eos_token_id"],
                 c["kwargs"]["length_penalty"], c["kwargs"]["early_stopping"]): c for c in cases}
        return sum(1 for k, c in seen.items() if k[-1] == a and k[:-1] + (b,) in seen
                   and best(seen[k[:-1] + (b,)]) != best(c))

    summary = {"model": model, "cases": len(cases),
               "with_eos": sum(c["kwargs"]["eos_token_id"] is not None for c in cases),
               "ended_by_eos": sum(any(n < N for n in c["lengths"]) for c in cases),
               "stopped_early": sum(c["steps"] < N for c in cases),
               "best_differs_true_false": differs(True, False),
               "best_differs_false_never": differs(False, "never"),
               "min_margin": min(c["min_margin"] for c in cases)}
    head = {"transformers": transformers.__version__, "torch": torch.__version__,
            "written_by": "scripts/make_golden.py", "min_beam_margin": MIN_BEAM_MARGIN,
            "generate": "GPT2LMHeadModel.generate(input_ids, attention_mask=ones, do_sample=False, "
                        "use_cache=True, output_scores=True, return_dict_in_generate=True, **kwargs); "
                        "sequences are the new tokens as returned (padded with pad_token_id), lengths "
                        "their true lengths (EOS included), steps the decoding steps run",
            "summary": summary}
    with open(os.path.join(GOLDEN, model, "beams.json"), "w") as f:  # one case per line: diffable
        rows = ",\n  ".join(json.dumps(c) for c in cases)
        f.write(json.dumps(head)[:-1] + f',\n "cases": [\n  {rows}]}}\n')
    return summary


def main(argv: list[str] | None = None) -> None:
    import torch
    import transformers

    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--beams-only"]):
        sys.exit("usage: make_golden.py [--beams-only]")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(GOLDEN, exist_ok=True)
    if not argv:
        info = {"torch": torch.__version__, "transformers": transformers.__version__, "models": []}
        for model, spec in MODELS.items():
            r = make(model, spec)
            info["models"].append(r)
            print(json.dumps(r))
        with open(os.path.join(GOLDEN, "README.json"), "w") as f:
            json.dump(info | {"written_by": "scripts/make_golden.py"}, f, indent=1)
    torch.set_num_threads(1)  # the beam cases run many tiny forwards: threads only add overhead
    for model, spec in MODELS.items():
        print(json.dumps(make_beams(model, spec)))
    total = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(GOLDEN) for fn in fns)
    print(f"golden files: {total / 1e6:.2f} MB")
    assert total < 2e6, "golden files must stay under 2 MB"


if __name__ == "__main__":
    main()
