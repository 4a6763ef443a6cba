"""Fine-tuning end to end, on tiny models trained here from scratch.

- SFT: reverse strings of 3-6 lowercase letters (`reverse abcd =` -> ` dcba`). A short LM
  pretraining (loss on every token of the same data), then SFT from it, must answer >= 95% of
  held-out strings exactly (greedy, ending at end-of-text), from Python and from
  `jaxgpt generate --stop-at-eot`. The SFT mask covers exactly completion + end-of-text; the
  pretraining learns the prompts, the SFT after it learns the completions and lets the prompts go.
- Classification: does a string of 6-10 digits hold more odd than even digits. (The digit-sum
  parity the issue suggests is the parity of that same count; parity is the classic function
  small transformers do not pick up by gradient descent in a test budget: 51% after 1000 steps
  here, so the test uses the majority of the count, which still needs every digit.) The head
  is fresh on a body from the LM checkpoint; >= 95% val accuracy; `jaxgpt eval` reports the
  confusion matrix; `jaxgpt classify` prints what the Python API returns.
- Early stopping on a plateau, and the best checkpoint is what loads by default.
- freeze=body keeps every body parameter bit for bit; body_lr_scale moves the body less.
- One-line errors for bad fine-tuning input.

Runs share compiled steps (same model and optimizer settings), so the whole file is mostly
training steps; the step counts are tuned to pass with a margin, not to be minimal.
"""

import json
import os
import shutil
from functools import partial

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxgpt import classify as classify_mod
from jaxgpt.checkpoint import list_steps, load_model, model_params, read_meta
from jaxgpt.classify import Classifier, read_texts
from jaxgpt.cli import main
from jaxgpt.config import Config, ModelConfig
from jaxgpt.data import Batcher, Dataset
from jaxgpt.errors import UserError
from jaxgpt.generation import generate
from jaxgpt.model import create_model
from jaxgpt.prepare import load_meta, prepare
from jaxgpt.tokenizer import get_tokenizer
from jaxgpt.train import lm_loss_sums

TOK = get_tokenizer("byte")
EOT = TOK.eot_id
LETTERS = "abcdefghijklmnopqrstuvwxyz"

MODEL = ModelConfig(block_size=24, n_layer=2, n_head=4, n_embd=64)  # longest example: 24 tokens
PRETRAIN_STEPS = 100
SFT_STEPS = 350
# Settings of every run. Runs that differ only in host-side keys (max_steps with an explicit
# decay_steps, intervals, init_from, patience) share one compiled step.
COMMON = dict(batch_size=64, lr=3e-3, min_lr=3e-4, warmup_steps=20, weight_decay=0.1,
              log_interval=10, eval_steps=4, save_interval=100_000, keep=1)
CLS_STEPS = 100
CLS_COMMON = dict(COMMON, model=ModelConfig(block_size=16), task="classify", lr=3e-3, min_lr=0.0,
                  warmup_steps=10, decay_steps=CLS_STEPS, eval_steps=16)


def _words(rng, n, exclude=()):
    seen, out = set(exclude), []
    while len(out) < n:
        w = "".join(rng.choice(list(LETTERS), int(rng.integers(3, 7))))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _prompt(w):
    return f"reverse {w} ="


def _write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


# ----------------------------------------------------------------------------- runs (shared)

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("finetune")


@pytest.fixture(scope="module")
def rev(work):
    """SFT data folder + held-out words that appear nowhere in it."""
    rng = np.random.default_rng(0)
    train_words = _words(rng, 2800)
    held = _words(rng, 100, exclude=train_words)
    src = work / "reverse.jsonl"
    _write_jsonl(src, [{"prompt": _prompt(w), "completion": " " + w[::-1]} for w in train_words])
    data = str(work / "reverse")
    prepare(str(src), data, tokenizer="byte", val_fraction=0.05, quiet=True)
    return {"data": data, "held": held}


def _run(quiet=True, **kw):
    from jaxgpt.train.loop import run_training
    return run_training(Config(**kw), quiet=quiet)


@pytest.fixture(scope="module")
def lm_run(rev, work):
    """Short pretraining from scratch, loss on every token (task=lm on the SFT data)."""
    out = str(work / "lm")
    _run(**COMMON, model=MODEL, data=rev["data"], out=out, task="lm", max_steps=PRETRAIN_STEPS,
         decay_steps=SFT_STEPS, eval_interval=PRETRAIN_STEPS)
    return out


@pytest.fixture(scope="module")
def sft_run(rev, work, lm_run):
    out = str(work / "sft")
    _run(**COMMON, model=MODEL, data=rev["data"], out=out, task="sft", init_from=lm_run,
         max_steps=SFT_STEPS, decay_steps=SFT_STEPS, eval_interval=SFT_STEPS)
    return out


def _odd_majority(s):
    return "odd" if 2 * sum(int(c) % 2 for c in s) > len(s) else "even"


def _digit_strings(rng, n):
    return ["".join(str(int(d)) for d in rng.integers(0, 10, int(rng.integers(6, 11)))) for _ in range(n)]


@pytest.fixture(scope="module")
def cls_data(work):
    rng = np.random.default_rng(1)
    src = work / "digits.jsonl"
    _write_jsonl(src, [{"text": s, "label": _odd_majority(s)} for s in _digit_strings(rng, 3000)])
    data = str(work / "digits")
    prepare(str(src), data, tokenizer="byte", quiet=True)
    return data


@pytest.fixture(scope="module")
def cls_run(cls_data, work, lm_run):
    """A fresh head on the LM checkpoint's body; the lr decays to exactly 0 at CLS_STEPS."""
    out = str(work / "cls")
    r = _run(**CLS_COMMON, data=cls_data, out=out, init_from=lm_run, max_steps=CLS_STEPS,
             eval_interval=CLS_STEPS // 2)
    return out, r


# ----------------------------------------------------------------------------- SFT

def _counted(batch, r):
    """The target ids of row r that the loss counts."""
    return batch["tokens"][r, 1:][batch["mask"][r] > 0].tolist()


def _word_of(tokens):
    text = TOK.decode([t for t in tokens if t != EOT])
    assert text.startswith("reverse ") and " =" in text, text
    return text[len("reverse "):text.index(" =")]


def test_sft_mask_is_exactly_completion_plus_eot(rev):
    ds = Dataset(rev["data"], "train", load_meta(rev["data"]))
    b = Batcher(ds, "sft", 32, MODEL.block_size, seed=0)
    assert b.truncated == b.dropped == 0
    batch = b.batch(0)
    for r in range(32):
        word = _word_of(batch["tokens"][r])
        assert _counted(batch, r) == TOK.encode(" " + word[::-1]) + [EOT]
        # the counted targets are one contiguous run right after the prompt
        idx = np.flatnonzero(batch["mask"][r])
        assert idx[0] == len(TOK.encode(_prompt(word))) - 1 and np.all(np.diff(idx) == 1)
    # Too long for the window: the prompt loses tokens from its left and the targets stay
    # whole; an example whose completion alone does not fit is dropped. Both are counted.
    for T, dropped in ((12, False), (6, True)):  # T=6 drops 5- and 6-letter words
        short = Batcher(ds, "sft", 32, T, seed=0)
        assert short.truncated > 0 and (short.dropped > 0) == dropped
        assert short.truncated + short.dropped == ds.n_docs  # every example is longer than T+1
        batch = short.batch(0)
        for r in range(32):
            counted = _counted(batch, r)
            assert counted[0] == TOK.encode(" ")[0] and counted[-1] == EOT
            word = TOK.decode(counted[1:-1])[::-1]
            full = TOK.encode(_prompt(word) + " " + word[::-1]) + [EOT]
            assert batch["tokens"][r].tolist() == full[-(T + 1):]


@partial(jax.jit, static_argnums=0)
def _token_losses(graphdef, params, tokens_BxT1):
    logits = nnx.merge(graphdef, params).logits(tokens_BxT1[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BxT1[:, 1:])


def test_lm_on_documents_trains_bos_text_eos(tmp_path):
    texts = ["order 4711: 2 x blue mug", "ok", "order 12: 9 x oak desk, ships to Oslo"]
    src = tmp_path / "docs.jsonl"
    _write_jsonl(src, [{"text": t} for t in texts * 4])
    prepare(str(src), str(tmp_path / "docs"), tokenizer="byte", quiet=True)
    ds = Dataset(str(tmp_path / "docs"), "train", load_meta(str(tmp_path / "docs")))
    batch = Batcher(ds, "lm", 8, 48, seed=0).batch(0)
    for r in range(8):
        counted = _counted(batch, r)
        text = TOK.decode(counted[:-1])
        assert text in texts and counted[-1] == EOT  # every token of the text, then EOS
        assert batch["tokens"][r, 0] == EOT  # after BOS: the empty prompt starts a document
        assert batch["mask"][r, 0] == 1 and batch["mask"][r].sum() == len(TOK.encode(text)) + 1


def _position_losses(model, batch):
    """Mean next-token loss over (prompt targets, completion + eot targets)."""
    losses = np.asarray(_token_losses(nnx.graphdef(model), model_params(model), batch["tokens"]))
    mask = batch["mask"]
    first = mask.argmax(1)  # first counted target of each row
    prompt = np.arange(mask.shape[1])[None, :] < first[:, None]
    return float(losses[prompt].mean()), float(losses[mask > 0].mean())


@pytest.mark.slow  # trains an SFT run (the SFT mask test stays in the default suite)
def test_sft_loss_leaves_the_prompt_out(rev, lm_run, sft_run):
    ds = Dataset(rev["data"], "val", load_meta(rev["data"]))
    batch = Batcher(ds, "sft", 64, MODEL.block_size, seed=0).batch(0, train=False)
    untrained = create_model(MODEL, seed=Config().seed)
    lm, sft = load_model(lm_run)[0], load_model(sft_run)[0]
    (p0, c0), (p_lm, c_lm), (p_sft, c_sft) = (_position_losses(m, batch) for m in (untrained, lm, sft))
    # The pretraining (loss on every token) learned the prompts: "reverse " is fixed text.
    # Measured: untrained 5.5 nats per prompt token, after pretraining 1.2.
    assert p_lm < p0 - 3.0 and c_lm < c0 - 2.5, (p0, p_lm, c0, c_lm)
    # SFT from it learned the completions (0.08) while its prompt loss drifted back up to near
    # the untrained level (5.0): nothing in its loss holds the prompt predictions. A loss that
    # counted the prompt would have kept them at the pretraining's level or below.
    assert c_sft < c0 - 4.0, (c0, c_sft)
    assert p_sft > p_lm + 2.0, (p_lm, p_sft)
    # and the loss the trainer minimises is the mean over exactly the masked positions
    loss = jax.jit(lambda p, b: lm_loss_sums(nnx.graphdef(sft), p, b, None)[:2])
    s, n = loss(model_params(sft), batch)
    np.testing.assert_allclose(float(s / n), c_sft, rtol=1e-5)
    flipped = dict(batch, mask=(batch["mask"] == 0).astype(np.float32))
    s, n = loss(model_params(sft), flipped)
    assert float(s / n) > c_sft + 1.0


@pytest.mark.slow  # trains an SFT run (the SFT mask test stays in the default suite)
def test_sft_answers_held_out_strings_and_stops_at_eot(rev, sft_run, tmp_path, capsys):
    model, cfg, meta = load_model(sft_run)
    assert cfg.task == "sft" and cfg.init_from.endswith("lm") and meta["step"] == SFT_STEPS
    held = rev["held"]
    outs = generate(model, [TOK.encode(_prompt(w)) for w in held], 12, temperature=0, eos_id=EOT)
    exact = [o == TOK.encode(" " + w[::-1]) + [EOT] for o, w in zip(outs, held)]
    assert np.mean(exact) >= 0.95, [TOK.decode(o) for o, ok in zip(outs, exact) if not ok]

    # The CLI (same prompts, so the same compiled programs): completions end where the
    # training completions ended.
    prompts = tmp_path / "prompts.jsonl"
    _write_jsonl(prompts, [{"prompt": _prompt(w)} for w in held])
    capsys.readouterr()
    assert main(["generate", "--ckpt", sft_run, "--prompt-file", str(prompts), "--temperature", "0",
                 "--stop-at-eot", "--max-new-tokens", "12", "--json"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.strip().splitlines()]
    assert [r["prompt"] for r in rows] == [_prompt(w) for w in held]
    for r, o, ok in zip(rows, outs, exact):
        assert r["new_tokens"] == len(o)  # same tokens as the Python API
        assert TOK.encode(r["completion"]) == (o[:-1] if o[-1] == EOT else o)
        if ok:  # stopped at end-of-text, not at the token limit, and printed without it
            assert len(o) < 12 and r["completion"] == TOK.decode(o[:-1])


# ----------------------------------------------------------------------------- classification

def test_classifier_reaches_95_percent_with_a_fresh_head_on_the_lm_body(cls_run, lm_run, capsys):
    out, r = cls_run
    assert r["val_acc"] >= 0.95, r
    model, cfg, meta = load_model(out)
    assert cfg.task == "classify" and cfg.model.n_classes == 2
    assert meta["data_meta"]["labels"] == ["even", "odd"]
    # the body came from the LM checkpoint (same architecture, cropped position table)
    lm_cfg = load_model(lm_run)[1]
    assert (cfg.model.n_layer, cfg.model.n_embd) == (lm_cfg.model.n_layer, lm_cfg.model.n_embd)
    assert cfg.model.block_size == 16

    capsys.readouterr()
    assert main(["eval", "--ckpt", out, "--json"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    conf = np.array(ev["confusion"])
    n_val = load_meta(cfg.data)["val_docs"]
    assert conf.shape == (2, 2) and conf.sum() == n_val  # every val example, once
    np.testing.assert_allclose(np.trace(conf) / conf.sum(), ev["val_acc"], rtol=1e-6)
    assert ev["val_acc"] >= 0.95 and ev["labels"] == ["even", "odd"]
    assert main(["eval", "--ckpt", out]) == 0
    text = capsys.readouterr().out
    assert "val acc" in text and "confusion matrix" in text


def test_classify_cli_prints_what_the_python_api_returns(cls_run, tmp_path, capsys):
    out, _ = cls_run
    texts = _digit_strings(np.random.default_rng(7), 40) + ["13579" * 2]
    clf = Classifier(out)
    res = clf.predict(texts)
    assert np.mean([r["label"] == _odd_majority(t) for r, t in zip(res, texts)]) >= 0.9
    for r in res:
        assert set(r["probs"]) == {"even", "odd"} and abs(sum(r["probs"].values()) - 1) < 1e-5
        assert r["label"] == max(r["probs"], key=r["probs"].get)

    def cli(*args):
        capsys.readouterr()
        assert main(["classify", "--ckpt", out, *args]) == 0
        return capsys.readouterr().out.strip().splitlines()

    as_json = [json.loads(l) for l in cli("--text", *texts, "--json")]
    assert as_json == res  # labels and probabilities, exactly
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    assert [json.loads(l) for l in cli("--input", str(tmp_path / "in.txt"), "--json")] == res
    assert [json.loads(l) for l in cli("--input", str(tmp_path / "in.jsonl"), "--json")] == res
    lines = cli("--text", texts[0], "--text", texts[1])
    for line, r in zip(lines, res[:2]):
        label, probs, text = line.split("\t")
        assert label == r["label"] and json.loads(text) == r["text"]
        assert probs == " ".join(f"{k}={v:.4f}" for k, v in r["probs"].items())


def test_classify_batches_exactly_and_compiles_once_per_shape(cls_run):
    out, _ = cls_run
    clf = Classifier(out)
    texts = _digit_strings(np.random.default_rng(3), 20)
    together = clf.probabilities(texts)
    alone = np.concatenate([clf.probabilities([t]) for t in texts])
    np.testing.assert_allclose(alone, together, atol=1e-5)  # padding and neighbours do not leak
    np.testing.assert_allclose(clf.probabilities(texts, max_batch=3), together, atol=1e-5)
    before = classify_mod.STATS["trace:class_probs"]
    clf.probabilities(_digit_strings(np.random.default_rng(4), 20))  # same buckets: no retrace
    assert classify_mod.STATS["trace:class_probs"] == before
    # the model sees what training saw: the text, then end-of-text, at most block_size tokens
    assert clf.encode("123") == TOK.encode("123") + [EOT]
    assert clf.encode("9" * 40) == TOK.encode("9" * 15) + [EOT]


# ----------------------------------------------------------------------------- early stopping

def test_early_stopping_on_a_plateau_keeps_the_best_checkpoint(cls_run, cls_data, lm_run, tmp_path,
                                                              capsys):
    # Continue the finished run: its lr schedule has reached 0, so every further evaluation
    # repeats the last one exactly, a plateau by construction.
    src, _ = cls_run
    out = str(tmp_path / "run")
    shutil.copytree(src, out)
    interval = CLS_STEPS // 2
    capsys.readouterr()
    r = _run(**CLS_COMMON, data=cls_data, out=out, init_from=lm_run,
             max_steps=CLS_STEPS + 10 * interval, eval_interval=interval, early_stop_patience=2,
             quiet=False)
    printed = capsys.readouterr().out
    assert r["stopped_early"] and r["step"] <= CLS_STEPS + 2 * interval, r
    assert "early stopping at step" in printed and "val_acc has not improved for 2 evals" in printed

    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    evals = [(row["val_acc"], -row["step"]) for row in rows if "val_acc" in row]
    best_step = -max(evals)[1]  # highest accuracy, earliest step on ties (the first to reach it)
    assert [s for s in list_steps(out) if s > CLS_STEPS] == [r["step"]]
    assert read_meta(out)[0] == best_step != r["step"]
    model, _, meta = load_model(out)
    assert meta["step"] == best_step
    assert meta["metrics"]["val_acc"] == max(evals)[0]


# ----------------------------------------------------------------------------- freeze / lr scale

def _body(params):
    return {k: v for k, v in params.items() if not k.startswith("cls_")}


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _short_cls(cls_data, lm_run, out, **kw):
    _run(**dict(CLS_COMMON, data=cls_data, out=out, init_from=lm_run, max_steps=3, eval_interval=3, **kw))
    return model_params(load_model(out, step=3)[0])


def test_freeze_body_keeps_every_body_param_and_trains_the_head(cls_data, lm_run, tmp_path):
    src = model_params(load_model(lm_run)[0])
    src["wpe"] = src["wpe"][:16]  # the run crops the position table to its block_size
    p = _short_cls(cls_data, lm_run, str(tmp_path / "frozen"), freeze="body")
    a, b = _flat(_body(src)), _flat(_body(p))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit for bit
    # the head is the run's fresh one (seeded), trained
    fresh = model_params(create_model(load_model(str(tmp_path / "frozen"))[1].model, Config().seed))
    assert not np.allclose(p["cls_w"], fresh["cls_w"]) and not np.allclose(p["cls_b"], fresh["cls_b"])


def test_body_lr_scale_moves_the_body_less(cls_data, lm_run, tmp_path):
    src = model_params(load_model(lm_run)[0])
    src["wpe"] = src["wpe"][:16]

    def body_moved(scale):
        p = _short_cls(cls_data, lm_run, str(tmp_path / f"s{scale}"), body_lr_scale=scale)
        a, b = _flat(_body(src)), _flat(_body(p))
        return np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a)), p

    full, p_full = body_moved(1.0)
    tenth, p_tenth = body_moved(0.1)
    assert 0 < tenth < 0.3 * full, (tenth, full)
    # the head learns at the full rate in both
    np.testing.assert_allclose(np.linalg.norm(p_tenth["cls_w"]), np.linalg.norm(p_full["cls_w"]), rtol=0.2)


# ----------------------------------------------------------------------------- errors

def _err(capsys, argv):
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def _one_line(code, err, needle):
    assert code == 2, err
    assert err.startswith("error:") and len(err.splitlines()) == 1 and needle in err, err


@pytest.mark.parametrize("line,needle", [
    ({"prompt": "a"}, "missing field 'completion'"),
    ({"prompt": "a", "completion": 5}, "field 'completion' must be a string"),
    ({"text": "a", "label": None}, "field 'label' must be a string or integer"),
    ({"text": ["a"], "label": "x"}, "field 'text' must be a string"),
])
def test_prepare_rejects_bad_fine_tuning_records(tmp_path, capsys, line, needle):
    first = {"prompt": "p", "completion": "c"} if "prompt" in line else {"text": "t", "label": "x"}
    src = tmp_path / "bad.jsonl"
    _write_jsonl(src, [first, line])
    out = tmp_path / "out"
    code, err = _err(capsys, ["prepare", "--input", str(src), "--out", str(out)])
    _one_line(code, err, needle)
    assert "line 2" in err and not out.exists()


def test_training_refuses_mismatched_fine_tuning_input(cls_data, rev, tmp_path, capsys):
    out = str(tmp_path / "o")
    base = ["train", f"out={out}", "max_steps=1", "model.n_layer=1", "model.n_embd=16", "model.n_head=2"]
    _one_line(*_err(capsys, base + [f"data={cls_data}", "task=sft"]), "does not match the data")
    _one_line(*_err(capsys, base + [f"data={rev['data']}", "task=classify"]), "does not match the data")
    _one_line(*_err(capsys, base + [f"data={rev['data']}", "task=lm", "freeze=body"]),
              "freeze=body needs task=classify")
    # a class that only val has (prepare never writes this; a hand-made folder can)
    bad = str(tmp_path / "bad_labels")
    shutil.copytree(cls_data, bad)
    labels = np.load(os.path.join(bad, "train_labels.npy"))
    np.save(os.path.join(bad, "train_labels.npy"), np.zeros_like(labels))
    _one_line(*_err(capsys, base + [f"data={bad}", "task=classify"]),
              "'odd' occurs in the val split but never in train")
    assert not os.path.exists(out)


def test_classify_cli_errors(lm_run, cls_run, tmp_path, capsys):
    out, _ = cls_run
    _one_line(*_err(capsys, ["classify", "--ckpt", lm_run, "--text", "12"]), "not a classifier")
    _one_line(*_err(capsys, ["classify", "--ckpt", str(tmp_path / "none"), "--text", "12"]), "not found")
    _one_line(*_err(capsys, ["classify", "--ckpt", out]), "one of the arguments --text --input is required")
    _one_line(*_err(capsys, ["classify", "--ckpt", out, "--text", "1", "--input", "x"]), "not allowed with")
    _one_line(*_err(capsys, ["classify", "--ckpt", out, "--input", str(tmp_path / "missing.txt")]), "not found")
    cases = {
        "empty.txt": ("\n  \n", "has no texts"),
        "empty.jsonl": ("", "has no texts"),
        "bad.jsonl": ('{"text": "12"}\n{"text": \n', "line 2: invalid JSON"),
        "notext.jsonl": ('{"label": "odd"}\n', "line 1: missing field 'text'"),
        "wrongtype.jsonl": ('{"text": 12}\n', "line 1: field 'text' must be a string"),
        "list.jsonl": ('["12"]\n', "line 1: expected a JSON object"),
    }
    for name, (content, needle) in cases.items():
        p = tmp_path / name
        p.write_text(content)
        _one_line(*_err(capsys, ["classify", "--ckpt", out, "--input", str(p)]), needle)
        with pytest.raises(UserError):
            read_texts(str(p))
