"""The training loop end to end: resume, checkpoints, eval from the checkpoint alone, CLI errors."""

import json
import os

import jax
import numpy as np
import pytest

from jaxgpt.checkpoint import list_steps, load_model, model_params, read_meta
from jaxgpt.cli import main
from jaxgpt.config import Config, ModelConfig
from jaxgpt.prepare import prepare
from jaxgpt.train.loop import run_training

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    src = d / "corpus.txt"
    src.write_text(TEXT)
    prepare(str(src), str(d / "byte"), tokenizer="byte", quiet=True)
    return str(d / "byte")


def tiny(data, out, **kw):
    base = dict(model=ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32), data=data, out=out,
                batch_size=16, max_steps=8, warmup_steps=2, decay_steps=8, log_interval=2,
                eval_interval=4, eval_steps=2, save_interval=4, keep=2)
    base.update(kw)
    return Config(**base)


@pytest.fixture(scope="module")
def ref8(data_dir, tmp_path_factory):
    """An uninterrupted 8-step run, the reference for the resume tests."""
    out = str(tmp_path_factory.mktemp("ref8") / "run")
    run_training(tiny(data_dir, out, max_steps=8), quiet=True)
    return out


def _params(out, step=None):
    return model_params(load_model(out, step)[0])


def _curve(out):
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    return [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]


def test_resume_equals_uninterrupted_bit_for_bit(data_dir, ref8, tmp_path, monkeypatch):
    # a relative out= (as `out/<run>`, the default, is): Orbax's restore takes absolute paths only
    monkeypatch.chdir(tmp_path)
    a, b = ref8, "b"
    run_training(tiny(data_dir, b, max_steps=4), quiet=True)
    run_training(tiny(data_dir, b, max_steps=8), quiet=True)
    pa, pb = _params(a, 8), _params(b, 8)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert _curve(a) == _curve(b)
    assert [s for s, _ in _curve(a)] == [2, 4, 6, 8]
    assert os.path.exists(os.path.join(a, "loss.png"))


def test_each_row_logs_the_lr_its_step_applied(ref8):
    # Row `step` s reports the lr of the update that made step s (the optimizer's count s - 1):
    # warmup 0 -> lr over warmup_steps, then cosine to min_lr at decay_steps, as nanoGPT.
    cfg = tiny("", "")
    rows = [json.loads(l) for l in open(os.path.join(ref8, "metrics.jsonl"))]
    logged = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert sorted(logged) == [2, 4, 6, 8]
    for step, lr in logged.items():
        t = step - 1
        if t < cfg.warmup_steps:
            want = cfg.lr * t / cfg.warmup_steps
        else:
            frac = (t - cfg.warmup_steps) / (cfg.decay_steps - cfg.warmup_steps)
            want = cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + np.cos(np.pi * frac))
        assert lr == pytest.approx(want, rel=1e-6), step


def test_the_run_ends_with_loss_png_drawn_from_every_row(data_dir, tmp_path, monkeypatch):
    """Evals redraw loss.png at most every 30 s (tests/test_metrics.py); the end of the run
    always draws it from every row, the last log rows included."""
    from jaxgpt import metrics

    calls = []
    real = metrics.MetricsLogger.plot
    monkeypatch.setattr(metrics.MetricsLogger, "plot",
                        lambda self, final=False: (calls.append((final, len(self.rows))), real(self, final))[1])
    out = str(tmp_path / "run")
    run_training(tiny(data_dir, out, max_steps=7, eval_interval=4), quiet=True)
    n_rows = sum(1 for _ in open(os.path.join(out, "metrics.jsonl")))
    assert calls[-1] == (True, n_rows) and n_rows > calls[0][1]


def test_checkpoints_keep_newest_plus_best_and_eval_needs_no_flags(data_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    run_training(tiny(data_dir, out, max_steps=12, eval_interval=4, save_interval=2, keep=2), quiet=True)
    steps = list_steps(out)
    assert steps[-2:] == [10, 12] and len(steps) <= 3  # newest 2 (+ the best, if older)
    step, meta = read_meta(out)
    assert meta["tokenizer"] == "byte" and meta["config"]["model"]["n_layer"] == 2
    assert meta["data_meta"]["kind"] == "stream" and "jaxgpt_version" in meta
    best = min((m["val_loss"], s) for s in steps if (m := read_meta(out, s)[1]["metrics"]).get("val_loss"))
    assert step == best[1]  # loading without --step takes the best by val loss
    capsys.readouterr()
    assert main(["eval", "--ckpt", out, "--json", "--step", "12"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(r) >= {"train_loss", "val_loss", "val_ppl", "step"} and r["step"] == 12
    np.testing.assert_allclose(r["val_ppl"], np.exp(r["val_loss"]), rtol=1e-6)
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    np.testing.assert_allclose(r["val_loss"], [x["val_loss"] for x in rows if x["step"] == 12][0], rtol=1e-5)


def test_ctrl_c_saves_and_resume_continues(data_dir, ref8, tmp_path, monkeypatch):
    from jaxgpt import data as data_mod
    out = str(tmp_path / "run")
    orig = data_mod.Batcher.batch

    def interrupt_at_5(self, step, train=True):
        if train and step == 5:
            raise KeyboardInterrupt
        return orig(self, step, train)

    monkeypatch.setattr(data_mod.Batcher, "batch", interrupt_at_5)
    with pytest.raises(KeyboardInterrupt):
        run_training(tiny(data_dir, out, save_interval=100, eval_interval=100), quiet=True)
    assert list_steps(out) == [5]
    monkeypatch.setattr(data_mod.Batcher, "batch", orig)
    run_training(tiny(data_dir, out, save_interval=100, eval_interval=100), quiet=True)
    for x, y in zip(jax.tree.leaves(_params(out, 8)), jax.tree.leaves(_params(ref8, 8))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_an_unfinished_save_does_not_hide_the_previous_checkpoint(data_dir, tmp_path):
    out = str(tmp_path / "run")
    run_training(tiny(data_dir, out, max_steps=4), quiet=True)
    # what a crash in the middle of an Orbax save leaves behind: a temporary step folder
    os.makedirs(os.path.join(out, "6.orbax-checkpoint-tmp-1234", "params"))
    model, cfg, meta = load_model(out)
    assert meta["step"] == 4
    run_training(tiny(data_dir, out, max_steps=6), quiet=True)  # resume still works
    assert 6 in list_steps(out)
    # the resumed writer (the only one: the run lock) removed the dead save's folder
    assert not [d for d in os.listdir(out) if "orbax-checkpoint-tmp" in d]


def _err(capsys, argv):
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("args,needle", [
    (["model.n_layers=3"], "unknown key"),
    (["batch_size=abc"], "expects int"),
    (["model.bias=maybe"], "expects bool"),
    (["batch_size=12"], "not divisible"),
    (["model.n_embd=30"], "not divisible by model.n_head"),
    (["model.block_size=100000"], "larger than the train data"),
    (["task=classify"], "does not match the data"),
    (["freeze=body"], "freeze=body needs task=classify"),
    (["dtype=float16"], "dtype must be one of"),
    (["lr=-1"], "lr"),
    (["notakeyvalue"], "expected key=value"),
])
def test_train_cli_errors_are_one_line(data_dir, tmp_path, capsys, args, needle):
    out = str(tmp_path / "o")
    code, err = _err(capsys, ["train", f"data={data_dir}", f"out={out}", "max_steps=1", *args])
    assert code == 2, err
    assert err.startswith("error:") and len(err.splitlines()) == 1 and needle in err, err
    assert not os.path.exists(out) or not any(d.isdigit() for d in os.listdir(out))


def test_an_impossible_config_fails_before_any_data_work(tmp_path, capsys, monkeypatch):
    import jaxgpt.train.loop
    default = tmp_path / "stdlib"  # stands in for the embedded corpus, prepared on first use
    monkeypatch.setattr(jaxgpt.train.loop, "DEFAULT_DATA", str(default))
    code, err = _err(capsys, ["train", f"data={default}", f"out={tmp_path}/o", "model.n_embd=30"])
    assert code == 2 and "not divisible by model.n_head" in err, err
    assert not default.exists()  # the corpus was not prepared for a run that cannot start
    code, err = _err(capsys, ["train", f"data={tmp_path}/missing", "batch_size=12"])
    assert code == 2 and "not divisible" in err, err


def test_other_cli_errors(tmp_path, capsys, data_dir):
    code, err = _err(capsys, ["train", "--config", "configs/nope.py"])
    assert code == 2 and "config file not found" in err
    code, err = _err(capsys, ["train", f"data={tmp_path}/missing", f"out={tmp_path}/o"])
    assert code == 2 and "no prepared data" in err or "not found" in err, err
    code, err = _err(capsys, ["eval", "--ckpt", str(tmp_path / "nothing")])
    assert code == 2 and "not found" in err
    foreign = tmp_path / "foreign"
    (foreign / "3").mkdir(parents=True)
    (foreign / "3" / "junk.txt").write_text("x")
    code, err = _err(capsys, ["eval", "--ckpt", str(foreign)])
    assert code == 2 and len(err.splitlines()) == 1, err
    code, err = _err(capsys, ["eval", "--ckpt", str(tmp_path), "--model.n_layer", "3"])
    assert code == 2 and "unrecognized arguments" in err


def test_resume_never_refuses_to_mix_runs(data_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    run_training(tiny(data_dir, out, max_steps=2), quiet=True)
    code, err = _err(capsys, ["train", f"data={data_dir}", f"out={out}", "resume=never",
                              "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32"])
    assert code == 2 and "already holds checkpoints" in err
    assert list_steps(out) == [2]
