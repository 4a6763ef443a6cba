"""Beam search == transformers' generate(num_beams=K, do_sample=False), without torch.

tests/data/golden/*/beams.json holds transformers' outputs (scripts/make_golden.py), each prompt
generated alone; here every case with the same K runs in ONE batch (prompts of different
lengths, EOS ids, length penalties and early-stopping rules side by side), so identical
sequences and scores also prove batched == single."""
import json
import os

import numpy as np
import pytest

from jaxgpt import generation as G
from jaxgpt.config import ModelConfig
from jaxgpt.errors import UserError
from jaxgpt.generation.beam import beam_search
from jaxgpt.model import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "data", "golden")


def _cases(name):
    with open(os.path.join(GOLDEN, name, "beams.json")) as f:
        return json.load(f)["cases"]


def _check_group(model, cases):
    kw0 = cases[0]["kwargs"]
    seqs, scores = beam_search(
        model, [c["prompt"] for c in cases], kw0["max_new_tokens"], kw0["num_beams"],
        length_penalty=[c["kwargs"]["length_penalty"] for c in cases],
        early_stopping=[c["kwargs"]["early_stopping"] for c in cases],
        eos_per_prompt=[c["kwargs"]["eos_token_id"] for c in cases],
        num_return_sequences=max(c["kwargs"]["num_return_sequences"] for c in cases))
    for c, got, got_scores in zip(cases, seqs, scores):
        m = c["kwargs"]["num_return_sequences"]
        want = [s[:n] for s, n in zip(c["sequences"], c["lengths"])]
        assert got[:m] == want, (c["kwargs"], c["prompt"])
        np.testing.assert_allclose(got_scores[:m], c["sequences_scores"], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def vocab1000():
    from jaxgpt import hf
    return hf.load_hf(os.path.join(GOLDEN, "vocab1000"))[0]


@pytest.mark.parametrize("K", [2, 3, 5])
def test_equals_transformers_on_every_golden_case(vocab1000, K):
    cases = [c for c in _cases("vocab1000") if c["kwargs"]["num_beams"] == K]
    assert len(cases) >= 30 and {c["kwargs"]["early_stopping"] for c in cases} == {False, True, "never"}
    assert any(c["kwargs"]["eos_token_id"] is not None for c in cases)
    assert {c["kwargs"]["length_penalty"] for c in cases} >= {0.5, 1.0, 2.0}
    _check_group(vocab1000, cases)


@pytest.mark.slow
@pytest.mark.parametrize("K", [2, 3, 5])
def test_equals_transformers_on_the_gpt2_vocabulary_model(tmp_path_factory, K):
    """The "odd" golden model: GPT-2's 50257 ids (padded to 50304), 3 heads of 32."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_golden", os.path.join(ROOT, "scripts", "make_golden.py"))
    make_golden = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_golden)
    from safetensors.numpy import save_file

    from jaxgpt import hf
    src = os.path.join(GOLDEN, "odd")
    d = tmp_path_factory.mktemp("odd")
    with open(os.path.join(src, "manifest.json")) as f:
        manifest = json.load(f)
    save_file(make_golden.rebuild_tensors("odd", manifest), str(d / "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f, open(d / "config.json", "w") as g:
        g.write(f.read())
    model = hf.load_hf(str(d))[0]
    _check_group(model, [c for c in _cases("odd") if c["kwargs"]["num_beams"] == K])


def test_the_reference_decode_path_gives_the_same_beams(vocab1000):
    """attention=xla (model.decode_step on the standard cache) vs the default cpu kernels."""
    from flax import nnx
    xla = nnx.merge(nnx.graphdef(create_model(vocab1000.cfg, 0, attention="xla")), nnx.state(vocab1000))
    assert vocab1000.attention == "cpu" and xla.attention == "xla"
    cases = [c for c in _cases("vocab1000") if c["kwargs"]["num_beams"] == 3][:12]
    _check_group(xla, cases)


CFG = ModelConfig(vocab_size=67, block_size=48, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def model():
    return create_model(CFG, seed=3)


def test_one_beam_is_greedy(model):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    seqs, _ = beam_search(model, prompts, 12, 1)
    assert [s[0] for s in seqs] == G.generate(model, prompts, 12, temperature=0)


def test_generate_api_returns_every_beam_grouped_by_prompt(model):
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    seqs, scores = G.generate(model, prompts, 10, num_beams=4, num_return_sequences=3, return_scores=True)
    assert len(seqs) == len(scores) == 6
    direct, direct_scores = beam_search(model, prompts, 10, 4, num_return_sequences=3)
    assert seqs == [s for row in direct for s in row]
    assert all(a >= b for row in direct_scores for a, b in zip(row, row[1:]))  # best first
    assert G.generate(model, prompts, 10, num_beams=4) == [row[0] for row in direct]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(num_beams=0), "num_beams must be an integer >= 1"),
    (dict(num_beams=2, temperature=0.7), "takes no temperature"),
    (dict(num_beams=2, top_k=5), "takes no top_k"),
    (dict(num_beams=3, stream=True), "cannot stream"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences must be"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping must be"),
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty must be"),
])
def test_bad_beam_arguments_are_one_line_errors(model, kwargs, needle):
    with pytest.raises(UserError, match=needle):
        G.generate(model, [[1, 2]], 5, **kwargs)


def test_beam_search_does_not_slide_past_the_window(model):
    with pytest.raises(UserError, match="does not slide past the window"):
        G.generate(model, [[1] * 40], 9, num_beams=2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from jaxgpt.checkpoint import save_model_checkpoint
    from jaxgpt.config import Config
    cfg = ModelConfig(vocab_size=257, block_size=48, n_layer=2, n_head=2, n_embd=32)
    d = str(tmp_path_factory.mktemp("beam_ckpt"))
    save_model_checkpoint(d, create_model(cfg, seed=1), Config(model=cfg), meta={"tokenizer": "byte"})
    return d


def test_cli_num_beams_prints_every_beam_and_its_score(ckpt, capsys):
    import jaxgpt
    from jaxgpt.cli import main
    m, tok = jaxgpt.load(ckpt)
    want, want_scores = G.generate(m, [tok.encode("hi")], 6, num_beams=3, num_return_sequences=2,
                                   return_scores=True)
    capsys.readouterr()
    assert main(["generate", "--ckpt", ckpt, "--prompt", "hi", "--max-new-tokens", "6",
                 "--num-beams", "3", "--num-return-sequences", "2", "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["beam"] for r in rows] == [0, 1]
    assert [r["completion"] for r in rows] == [tok.decode(w) for w in want]
    np.testing.assert_allclose([r["score"] for r in rows], want_scores, atol=1e-5)


@pytest.mark.parametrize("flags, needle", [
    (["--num-beams", "0"], "--num-beams must be >= 1"),
    (["--num-beams", "2", "--temperature", "0.5"], "cannot be combined with --temperature"),
    (["--num-beams", "2", "--stream"], "cannot be combined with --stream"),
    (["--num-beams", "2", "--num-samples", "2"], "use --num-return-sequences"),
    (["--length-penalty", "2"], "needs --num-beams > 1"),
])
def test_cli_beam_errors_are_one_line(ckpt, capsys, flags, needle):
    from jaxgpt.cli import main
    assert main(["generate", "--ckpt", ckpt, "--prompt", "hi"] + flags) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
