"""int8 weight-only quantization (jaxgpt/quant.py): the rounding bound of a quantized product,
cached decode against the full forward with the same int8 weights, the val loss of a small
trained model, and the --quantize flag of `generate` and `eval`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxgpt
from jaxgpt import generation as G
from jaxgpt import quant
from jaxgpt.cli import main
from jaxgpt.config import Config, ModelConfig
from jaxgpt.errors import UserError
from jaxgpt.generation.sampling import SamplingFlags, SamplingParams
from jaxgpt.model import create_model, init_cache

F32_EPS = float(np.finfo(np.float32).eps)


# ----------------------------------------------------------------------------- the product bound
def _weight(rng, n_in, n_out):
    """Columns whose magnitudes span four decades: a per-tensor scale would be far too coarse
    for the small ones, so only per-output-channel scales meet the bound below."""
    return rng.standard_normal((n_in, n_out)) * np.logspace(-3, 1, n_out)[None, :]


def _check_product(x, w, y):
    """x (B, in) float64, w (in, out) float64 (the float weight), y (B, out): the quantized
    product. Asserts |x@W - y| <= sum|x| * s/2 per output channel, s = max|W[:, o]| / 127, plus
    float32 rounding of the product; returns the error over that bound (for the tightness check)."""
    s = np.abs(w).max(0) / 127  # the per-output-channel scale, computed here independently
    bound = np.abs(x).sum(1, keepdims=True) * s[None, :] / 2
    fp = 4 * F32_EPS * (np.abs(x) @ np.abs(w)) * np.sqrt(w.shape[0])  # float32 accumulation
    err = np.abs(x @ w - np.asarray(y, np.float64))
    assert (err <= bound + fp).all(), float(np.max((err - fp) / bound))
    return err / bound


@pytest.mark.parametrize("layout", ["in_out", "out_in", "head"])
def test_quantized_product_is_within_the_int8_rounding_bound(layout):
    """Per output channel o, |W - s*q| <= s/2 elementwise, so |x@W - x@(s*q)| <= sum|x| * s/2.

    Each row of x is aimed at one channel (x_i = sign of that channel's rounding error), which
    drives that channel's error to a large fraction of the bound: the bound is tight, and
    truncation instead of rounding, a per-tensor scale or a scale on the wrong axis break it."""
    rng = np.random.default_rng(0)
    n_in, n_out = 96, 80
    w = _weight(rng, n_in, n_out)
    if layout == "in_out":  # model._linear, cpu decode at one row
        qa = quant.quantize(jnp.asarray(w, jnp.float32), 0)
        deq = np.asarray(qa.q, np.float64) * np.asarray(qa.scale, np.float64)
    elif layout == "out_in":  # cpu decode above one row: weights stored (out, in)
        qa = quant.quantize(jnp.asarray(w.T, jnp.float32), 1)
        deq = (np.asarray(qa.q, np.float64) * np.asarray(qa.scale, np.float64)).T
    else:  # the tied head: wte (V, D), one scale per vocabulary row
        qa = quant.quantize(jnp.asarray(w.T, jnp.float32), -1)
        deq = (np.asarray(qa.q, np.float64) * np.asarray(qa.scale, np.float64)).T
    assert qa.q.dtype == jnp.int8 and int(np.abs(np.asarray(qa.q)).max()) == 127
    s = np.abs(w).max(0) / 127
    # Elementwise: round to nearest, one scale per output channel.
    assert (np.abs(w - deq) <= s[None, :] / 2 * (1 + 1e-5)).all()
    # Adversarial activations: row o has the signs of channel o's rounding error.
    signs = np.sign(w - deq).T  # (out, in)
    x = signs * rng.uniform(0.5, 1.5, signs.shape)
    x32 = jnp.asarray(x, jnp.float32)
    x = np.asarray(x32, np.float64)
    if layout == "in_out":
        y = quant.matmul(x32, qa, jnp.float32)
    elif layout == "out_in":
        y = quant.matmul_T(qa, x32.T, jnp.float32).T
    else:
        cfg = ModelConfig(vocab_size=n_out, block_size=8, n_layer=1, n_head=1, n_embd=n_in)
        model = create_model(cfg, 0, attention="xla")
        wte = np.zeros((cfg.padded_vocab, n_in), np.float32)
        wte[:n_out] = w.T
        model.wte[...] = jnp.asarray(wte)
        y = quant.quantize_model(model).head(x32)  # GPT.head on the int8 table
    ratio = _check_product(x, w, y)
    assert np.diag(ratio).min() > 0.3  # each aimed channel comes near its bound: tight


def test_quantize_model_replaces_matrices_and_head_only():
    cfg = ModelConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = create_model(cfg, 0)
    qm = quant.quantize_model(model)
    flat = dict(nnx.to_flat_state(nnx.state(qm, nnx.Param)))
    kinds = {"/".join(map(str, k)): type(v.get_value()).__name__ for k, v in flat.items()}
    assert {k for k, t in kinds.items() if t == "QArray"} == {
        "wte", "blocks/w_qkv", "blocks/w_attn_out", "blocks/w_fc", "blocks/w_mlp_out"}
    w = qm.blocks.w_fc[...]
    assert w.q.shape == (2, 32, 128) and w.scale.shape == (2, 1, 128)  # per layer, per column
    assert qm.wte[...].scale.shape == (cfg.padded_vocab, 1)  # per vocabulary row
    assert isinstance(model.wte[...], jax.Array)  # the source model is untouched
    # The weight bytes a decode step reads drop ~4x (int8 plus one float32 scale per channel).
    matrices = lambda m: [m.wte[...]] + [getattr(m.blocks, n)[...] for n in quant.BLOCK_MATRICES]  # noqa: E731
    ratio = quant.weight_bytes(matrices(model)) / quant.weight_bytes(matrices(qm))
    assert 3.5 < ratio <= 4
    with pytest.raises(UserError, match="unknown quantize mode 'fp8'"):
        quant.quantize_model(model, "fp8")


# ----------------------------------------------------------------------------- trained model
CORPUS_FILES = sorted(Path(jaxgpt.__file__).parent.rglob("*.py"))
TRAIN = dict(model=ModelConfig(block_size=32, n_layer=2, n_head=4, n_embd=64), batch_size=32,
             max_steps=300, lr=3e-3, min_lr=3e-4, warmup_steps=20, decay_steps=300, log_interval=50,
             eval_interval=300, eval_steps=8, save_interval=100_000, keep=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-layer, 64-wide byte model trained for 300 steps on jaxgpt's own source."""
    from jaxgpt.prepare import prepare
    from jaxgpt.train.loop import run_training

    work = tmp_path_factory.mktemp("quant")
    src = work / "corpus.txt"
    src.write_text("\n".join(f.read_text(encoding="utf-8") for f in CORPUS_FILES), encoding="utf-8")
    data = str(work / "data")
    prepare(str(src), data, tokenizer="byte", val_fraction=0.1, quiet=True)
    out = str(work / "run")
    run_training(Config(data=data, out=out, **TRAIN), quiet=True)
    return out


def test_quantized_val_loss_is_within_one_percent(trained):
    from jaxgpt.evaluate import evaluate_checkpoint

    f = evaluate_checkpoint(trained)
    q = evaluate_checkpoint(trained, quantize="int8")
    # trained: the byte-level uniform loss is ln(257) = 5.55. Not tighter: the corpus is
    # jaxgpt's own source, so this figure moves a little with every commit.
    assert f["val_loss"] < 3.0, f
    assert q["quantize"] == "int8" and "quantize" not in f
    assert abs(q["val_loss"] - f["val_loss"]) <= 0.01 * f["val_loss"], (f["val_loss"], q["val_loss"])
    assert q["val_loss"] != f["val_loss"]  # the int8 weights were really used


@pytest.mark.parametrize("attention", ["cpu", pytest.param("xla", marks=pytest.mark.slow)])
def test_quantized_cached_decode_equals_quantized_full_forward(trained, attention):
    """The cached path (prefill + scan decode; with the cpu backend its kernels at one row and
    at several) against the full forward, both with the same int8 weights: each greedy token is
    the argmax of the full forward over the sequence before it, and the logits it was chosen
    from match that forward's within float rounding. Float and int8 logits differ by ~1e-2 here,
    so decoding with float weights anywhere fails the logits check."""
    from jaxgpt.checkpoint import load_model
    from jaxgpt.tokenizer import get_tokenizer

    model, _, meta = load_model(trained, attention=attention)
    model, tok = quant.quantize_model(model), get_tokenizer(meta["tokenizer"])
    assert model.attention == attention and quant.quantized_model(model)
    prompts = [tok.encode(p) for p in ("import jax\n", "def generate(", "    return ")]
    n, T, S = 10, 16, 32
    graphdef, params = nnx.split(model)
    # The cpu backend decodes one row with other kernels than several (for float weights; int8
    # ones keep the (out, in) layout at every row count, with its own head path): test both.
    for batch in ([prompts[0]], prompts) if attention == "cpu" else (prompts,):
        B = G.batch_bucket(len(batch))
        tokens = np.zeros((B, T), np.int32)
        lengths = np.ones((B,), np.int32)
        for i, p in enumerate(batch):
            tokens[i, :len(p)], lengths[i] = p, len(p)
        tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
        logits0, cache = G.prefill(graphdef, params, tokens, lengths, init_cache(model.cfg, B, S))
        state, tok0 = G.init_decode_state(
            logits0, cache, tokens, lengths, jnp.full((B,), n), jnp.full((B,), -1), jnp.arange(B),
            jax.random.key(0), SamplingParams.make(B, 0.0), flags=SamplingFlags(sample=False),
            windowed=False, history_len=1)
        state, toks, step_logits = G.decode(graphdef, params, state, n - 1, return_logits=True)
        toks = np.concatenate([np.asarray(tok0)[:, None], np.asarray(toks)], 1)
        logits = np.concatenate([np.asarray(logits0)[:, None], np.asarray(step_logits)], 1)
        # The full forward of each whole sequence (causal: position t sees only tokens <= t).
        seqs = np.zeros((len(batch), S), np.int32)
        for b, p in enumerate(batch):
            seqs[b, :len(p) + n] = p + toks[b].tolist()
        full = np.asarray(jaxgpt.logits(model, seqs))
        for b, p in enumerate(batch):
            want = full[b, len(p) - 1:len(p) - 1 + n]
            assert toks[b].tolist() == want.argmax(-1).tolist()
            np.testing.assert_allclose(logits[b], want, atol=2e-4, rtol=0)


def _dequantized(model):
    """The float model whose weights are exactly the int8 model's s * q."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(
        lambda v: v.astype(jnp.float32) if quant.is_quantized(v) else v, state, is_leaf=quant.is_quantized))


@pytest.mark.slow
def test_speculative_and_beam_search_with_int8_models(trained):
    """The int8 model is a normal model to the rest of generation: speculative decoding (int8
    target and draft, or a float draft) and beam search give what the float model with the
    dequantized weights gives, and speculative greedy equals the int8 target's plain greedy."""
    target, tok = jaxgpt.load(trained, quantize="int8")
    ref = _dequantized(target)
    cfg = target.cfg
    draft = quant.quantize_model(create_model(ModelConfig(**dict(vars(cfg), n_layer=1, n_embd=32, n_head=2)), 3))
    prompts = [tok.encode(p) for p in ("import jax\n", "def generate(", "    return ")]
    greedy = G.generate(target, prompts, 12, temperature=0)
    assert greedy == G.generate(ref, prompts, 12, temperature=0)
    for d in (draft, _dequantized(draft)):
        out, stats = G.generate(target, prompts, 12, temperature=0, draft=d, num_draft=3, return_stats=True)
        assert out == greedy
    seqs, scores = G.generate(target, prompts, 10, num_beams=3, num_return_sequences=2, return_scores=True)
    want_seqs, want_scores = G.generate(ref, prompts, 10, num_beams=3, num_return_sequences=2,
                                        return_scores=True)
    assert seqs == want_seqs and len(seqs) == 6
    np.testing.assert_allclose(scores, want_scores, atol=1e-4)


def _computations(hlo: str) -> dict:
    """name -> body lines of each computation of a compiled HLO module's text."""
    comps, name = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if m:
            name = m.group(1)
            comps[name] = []
        elif name:
            comps[name].append(line)
    return comps


def _int8_converts(hlo: str):
    """Every conversion of an int8 value to a float: (elements, inside a while loop?)."""
    comps = _computations(hlo)
    called = {c: set(re.findall(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)", "\n".join(ls)))
              for c, ls in comps.items()}
    in_loop, todo = set(), [b for ls in comps.values() for ln in ls for b in re.findall(r"body=%([\w.\-]+)", ln)]
    while todo:
        c = todo.pop()
        if c not in in_loop:
            in_loop.add(c)
            todo += called.get(c, ())
    out = []
    for c, ls in comps.items():
        types = dict(re.findall(r"(%[\w.\-]+) = (\w+)\[", "\n".join(ls)))
        for ln in ls:
            m = re.search(r"= (f32|bf16)\[([\d,]*)\]\S* convert\((%[\w.\-]+)\)", ln)
            if m and types.get(m.group(3)) == "s8":
                out.append((int(np.prod([int(d) for d in m.group(2).split(",") if d])), c in in_loop))
    return out


@pytest.mark.parametrize("attention,rows", [("cpu", 1), pytest.param("cpu", 3, marks=pytest.mark.slow),
                                            pytest.param("xla", 3, marks=pytest.mark.slow)])
def test_decode_reads_the_int8_weights(attention, rows, monkeypatch):
    """The compiled decode loop converts int8 weights inside the loop, a chunk at a time: no
    float copy of a whole matrix is made, neither per step nor hoisted out of the loop (which
    XLA does to a plain `q.astype(f32)`, leaving the loop to read float32 weights)."""
    monkeypatch.setattr(quant, "CHUNK_BYTES", 4096)  # several chunks per matrix
    cfg = ModelConfig(vocab_size=500, block_size=32, n_layer=2, n_head=2, n_embd=64)
    # XLA's own products (kernel="xla"); the int8 kernel converts nothing in XLA at all
    # (tests/test_int8_kernel.py checks that decode calls it instead).
    model = quant.quantize_model(create_model(cfg, 0, attention=attention), kernel="xla")
    graphdef, params = nnx.split(model)
    B, T = G.batch_bucket(rows), 8
    tokens, lengths = jnp.ones((B, T), jnp.int32), jnp.full((B,), T, jnp.int32)
    logits0, cache = G.prefill(graphdef, params, tokens, lengths, init_cache(cfg, B, 32))
    state, _ = G.init_decode_state(
        logits0, cache, tokens, lengths, jnp.full((B,), 4), jnp.full((B,), -1), jnp.arange(B),
        jax.random.key(0), SamplingParams.make(B, 0.0), flags=SamplingFlags(sample=False),
        windowed=False, history_len=1)
    weights = G.decode_weights(graphdef, params, B)
    if attention == "cpu":  # int8 decodes in the (out, in) layout at every row count, one included
        assert "head_VpxD" in weights and "w_fc_out_in" in weights["layers"][0]
    assert {type(w).__name__ for w in jax.tree.leaves(weights, is_leaf=quant.is_quantized)
            if quant.is_quantized(w)} == {"QArray"}
    hlo = G.engine._decode_loop.lower(graphdef, params, weights, state, 4).compile().as_text()
    converts = _int8_converts(hlo)
    assert len(converts) >= 2 * 4 + 1  # every matrix and the head
    assert all(inside for _, inside in converts), "an int8 -> float conversion left the loop"
    assert max(n for n, _ in converts) <= 4096, "a whole matrix is converted at once"


# ----------------------------------------------------------------------------- CLI and load
def _json_lines(capsys):
    return [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.strip()]


def test_cli_generate_and_eval_quantize(trained, capsys, monkeypatch):
    model, tok = jaxgpt.load(trained, quantize="int8")
    want = G.generate(model, [tok.encode("def ")], 12, temperature=0)
    served = []  # whether the model the CLI generates with is quantized

    def generate(m, *a, **k):
        served.append(quant.quantized_model(m))
        return want_generate(m, *a, **k)

    want_generate = G.generate
    monkeypatch.setattr(G, "generate", generate)
    rc = main(["generate", "--ckpt", trained, "--prompt", "def ", "--max-new-tokens", "12",
               "--temperature", "0", "--json", "--quantize", "int8"])
    assert rc == 0 and _json_lines(capsys)[0]["completion"] == tok.decode(want[0])
    assert served == [True]
    # The CLI's int8 eval against its float eval over the same batches. The model trains on
    # jaxgpt's own source, so its absolute loss moves with every commit; the pair does not.
    rc = main(["eval", "--ckpt", trained, "--json", "--steps", "2", "--quantize", "int8"])
    row = _json_lines(capsys)[0]
    assert rc == 0 and row["quantize"] == "int8"
    assert main(["eval", "--ckpt", trained, "--json", "--steps", "2"]) == 0
    f_row = _json_lines(capsys)[0]
    assert "quantize" not in f_row and f_row["val_loss"] < 3.0  # trained (uniform: 5.55)
    assert row["val_loss"] != f_row["val_loss"]
    assert abs(row["val_loss"] - f_row["val_loss"]) <= 0.01 * f_row["val_loss"]
    assert quant.MODES == ("int8",)  # the CLI's --quantize choices (not imported there)
    for cmd in (["generate", "--prompt", "x"], ["eval"]):
        rc = main([cmd[0], "--ckpt", trained, *cmd[1:], "--quantize", "int4"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "invalid choice: 'int4'" in err, err
    with pytest.raises(UserError, match="unknown quantize mode 'int4'"):
        jaxgpt.load(trained, quantize="int4")
