"""Faults and recovery (issue #16): real kills, damaged checkpoints, NaN, the run lock, a full
disk, an interrupted prepare, and bad or foreign inputs. Every fault is a real one (SIGKILL,
SIGTERM, truncated files) or one injected at a test-only fault point (`JAXGPT_FAULT`, see
jaxgpt/train/faults.py). Subprocess runs use the same 8 simulated devices as this process, so
their losses are comparable bit for bit with in-process runs."""

import dataclasses
import glob
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxgpt import checkpoint as ckpt
from jaxgpt.checkpoint import list_steps, load_model, model_params, read_meta
from jaxgpt.cli import main
from jaxgpt.config import Config, ModelConfig
from jaxgpt.errors import UserError
from jaxgpt.metrics import MetricsLogger
from jaxgpt.prepare import load_meta, prepare
from jaxgpt.train import faults
from jaxgpt.train.loop import run_training

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))
MODEL = dict(block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
# decay_steps fixed: runs of any max_steps share one schedule, so their losses are comparable
RUN = dict(batch_size=16, warmup_steps=2, decay_steps=24, log_interval=2, eval_interval=4,
           eval_steps=2, save_interval=4, keep=2)
CURVE_KEYS = ("train_loss", "val_loss", "eval_train_loss", "lr", "grad_norm")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "corpus.txt").write_text(TEXT)
    prepare(str(d / "corpus.txt"), str(d / "byte"), tokenizer="byte", quiet=True)
    return str(d / "byte")


def tiny(data, out, **kw) -> Config:
    return Config(model=ModelConfig(**MODEL), data=str(data), out=str(out), **{**RUN, **kw})


def cli_args(data, out, **kw) -> list[str]:
    """`jaxgpt train` arguments for exactly the Config of tiny(data, out, **kw)."""
    return ([f"model.{k}={v}" for k, v in MODEL.items()]
            + [f"{k}={v}" for k, v in {"data": data, "out": out, **RUN, **kw}.items()])


@pytest.fixture(scope="module")
def ref(data_dir, tmp_path_factory):
    """An uninterrupted 24-step run: the reference every recovered run must equal."""
    out = str(tmp_path_factory.mktemp("ref") / "run")
    run_training(tiny(data_dir, out, max_steps=24, keep=100), quiet=True)
    return out


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def curve(out, upto=None):
    """The logged values a recovered run must reproduce, by step (timings excluded)."""
    got = {}
    for r in rows(out):
        if upto is None or r["step"] <= upto:
            assert r["step"] not in got, f"duplicate metrics row for step {r['step']}"
            got[r["step"]] = {k: r[k] for k in CURVE_KEYS if k in r}
    return got


def assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _err(capsys, argv):
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def _one_line_error(err, needle):
    last = err.splitlines()[-1] if err else ""
    assert last.startswith("error:") and needle in last, err
    assert "Traceback" not in err, err


def _tmp_dirs(out):
    return glob.glob(os.path.join(out, "*.orbax-checkpoint-tmp*"))


def _tmp_steps(out):
    return [int(os.path.basename(p).split(".")[0]) for p in _tmp_dirs(out)]


# ----------------------------------------------------------------------------- real kills

def _popen(args, fault="", cache=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXGPT_FAULT=fault)  # XLA_FLAGS: conftest's 8 devices
    if cache:  # the runs of one test share their compilations (the first compiles, ~10 s saved each)
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return subprocess.Popen([sys.executable, "-m", "jaxgpt", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, proc, timeout=300):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) first: {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.01)


def _last_row_step(out):
    try:
        return max((r["step"] for r in rows(out)), default=0)
    except (OSError, ValueError):
        return 0


def test_sigkill_in_a_save_and_in_a_step_then_resume_exactly(data_dir, ref, tmp_path):
    out, cache = str(tmp_path / "run"), tmp_path / "jax-cache"
    args = cli_args(data_dir, out, max_steps=24)

    # 1. SIGKILL inside the write of checkpoint 8 (a test-only delay holds it open before commit)
    p = _popen(args, "save_delay=120@8", cache)
    _wait_for(lambda: 8 in _tmp_steps(out), p)
    p.kill(), p.wait()
    assert list_steps(out) == [4] and _tmp_steps(out) == [8]  # the unfinished write is no checkpoint
    assert read_meta(out)[0] == 4 and load_model(out)[2]["step"] == 4

    # 2. resume (the lock a SIGKILL left is free again), then SIGKILL in the middle of a step
    p = _popen(args, "step_delay=0.05", cache)
    _wait_for(lambda: _last_row_step(out) >= 14, p)
    time.sleep(random.Random(0).uniform(0, 0.05))
    p.kill(), p.wait()
    assert 8 not in _tmp_steps(out)  # the resumed writer removed the dead write's folder
    # at most save_interval steps lost, plus those run while the newest save was being written
    assert _last_row_step(out) - max(list_steps(out)) <= 2 * 4

    # 3. finish: every logged value and the final params equal the uninterrupted run's
    run_training(tiny(data_dir, out, max_steps=24), quiet=True)
    assert curve(out) == curve(ref)
    assert_same_params(model_params(load_model(out, 24)[0]), model_params(load_model(ref, 24)[0]))
    assert not _tmp_steps(out) and not os.path.exists(os.path.join(out, ".lock"))


def _signal_at(monkeypatch, step_index, *signals):
    from jaxgpt import data as data_mod
    orig = data_mod.Batcher.batch

    def batch(self, step, train=True):
        if train and step == step_index:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return orig(self, step, train)

    monkeypatch.setattr(data_mod.Batcher, "batch", batch)


def test_sigterm_during_an_async_save_saves_then_exits_75(data_dir, ref, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    monkeypatch.setenv("JAXGPT_FAULT", "save_delay=1.5@4")  # checkpoint 4 is still being written...
    _signal_at(monkeypatch, 5, signal.SIGTERM)  # ...when SIGTERM comes, while step 6 is computed
    capsys.readouterr()
    assert main(["train", *cli_args(data_dir, out, max_steps=12)]) == faults.EXIT_SIGTERM
    assert "interrupted at step 6; checkpoint saved" in capsys.readouterr().out
    assert list_steps(out) == [4, 6] and not _tmp_steps(out)  # both complete, nothing half-written
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    monkeypatch.undo()
    run_training(tiny(data_dir, out, max_steps=12), quiet=True)
    assert curve(out) == curve(ref, upto=12)


def test_a_second_signal_or_one_before_any_step_stops_at_once(data_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    run_training(tiny(data_dir, out, max_steps=4), quiet=True)
    _signal_at(monkeypatch, 6, signal.SIGINT, signal.SIGINT)
    with pytest.raises(faults.Interrupted) as e:
        run_training(tiny(data_dir, out, max_steps=12), quiet=True)
    assert not e.value.saved and e.value.exit_code == faults.EXIT_SIGINT
    assert list_steps(out) == [4]
    _signal_at(monkeypatch, 4, signal.SIGTERM)  # the first batch after resuming from step 4
    with pytest.raises(faults.Interrupted) as e:
        run_training(tiny(data_dir, out, max_steps=12), quiet=True)
    assert not e.value.saved and e.value.exit_code == faults.EXIT_SIGTERM
    assert list_steps(out) == [4] and not os.path.exists(os.path.join(out, ".lock"))


@pytest.mark.slow
def test_eight_sigkills_at_random_moments_leave_every_loss_bit_equal(data_dir, ref, tmp_path):
    """The regression of issue #16: each kill at a random moment of a dropout-0.1 run, each
    followed by resume=auto, and the loss log ends equal to the uninterrupted run's."""
    out = str(tmp_path / "run")
    rng = random.Random(16)
    for _ in range(8):
        p = _popen(cli_args(data_dir, out, max_steps=24, save_interval=2), "step_delay=0.03",
                   tmp_path / "jax-cache")
        start = _last_row_step(out)
        _wait_for(lambda: _last_row_step(out) > start or p.poll() is not None, p)
        time.sleep(rng.uniform(0, 0.4))
        p.kill(), p.wait()
    run_training(tiny(data_dir, out, max_steps=24), quiet=True)
    assert curve(out) == curve(ref)
    assert_same_params(model_params(load_model(out, 24)[0]), model_params(load_model(ref, 24)[0]))


@pytest.mark.slow
def test_a_kill_right_after_a_save_keeps_that_steps_metrics_row(data_dir, ref, tmp_path):
    """Step 6 is logged (one step late) and saved but not evaluated: its row must be on disk
    before its checkpoint commits, or a kill at that moment loses the row for good (the resumed
    run starts at step 7)."""
    out = str(tmp_path / "run")
    p = _popen(cli_args(data_dir, out, max_steps=12, save_interval=6), "kill_after_save=6")
    p.communicate(timeout=600)
    assert p.returncode == -signal.SIGKILL and max(list_steps(out)) == 6
    assert _last_row_step(out) == 6
    run_training(tiny(data_dir, out, max_steps=12, save_interval=6), quiet=True)
    assert curve(out) == curve(ref, upto=12)


@pytest.mark.slow
def test_sigterm_from_outside_while_a_checkpoint_is_written(data_dir, tmp_path):
    out = str(tmp_path / "run")
    p = _popen(cli_args(data_dir, out, max_steps=24), "save_delay=2@8;step_delay=0.05")
    _wait_for(lambda: 8 in _tmp_steps(out), p)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == faults.EXIT_SIGTERM, stderr[-2000:]
    stopped = int(stdout.split("interrupted at step ")[1].split(";")[0])
    assert "checkpoint saved" in stdout and max(list_steps(out)) == stopped >= 8
    assert not _tmp_steps(out) and not os.path.exists(os.path.join(out, ".lock"))
    assert "SIGTERM: stopping after this step" in stderr and "Traceback" not in stderr


# ----------------------------------------------------------------------------- the run lock

def test_a_second_run_on_the_same_folder_is_refused(data_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom jaxgpt.train.faults import RunLock\n"
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(300)", out],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = _err(capsys, ["train", *cli_args(data_dir, out, max_steps=2)])
        assert code == 2 and len(err.splitlines()) == 1, err
        _one_line_error(err, f"in use by another `jaxgpt train` (pid {holder.pid} on {socket.gethostname()}")
        assert os.listdir(out) == [".lock"]  # the refused run wrote nothing
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            faults.RunLock(out).acquire()
    finally:
        holder.kill()
        holder.wait()
    # SIGKILL leaves the file behind, but the OS dropped the lock with the process
    with faults.RunLock(out) as lock:
        assert f"pid {os.getpid()} " in open(lock.path).read()
        with pytest.raises(UserError, match=f"pid {os.getpid()} "):
            faults.RunLock(out).acquire()  # a second lock, even from this same process
    assert not os.path.exists(os.path.join(out, ".lock"))


# ----------------------------------------------------------------------------- NaN / Inf

def test_nan_stop_names_the_step_and_saves_nothing_after_it(data_dir, ref, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    monkeypatch.setenv("JAXGPT_FAULT", "nan_at=7")
    code, err = _err(capsys, ["train", *cli_args(data_dir, out, max_steps=12)])
    assert code == faults.EXIT_NONFINITE
    _one_line_error(err, "at step 7 (nan_policy=stop)")
    assert list_steps(out) == [4]  # no save at 8, no final save: step 4 stays the latest
    assert max(r["step"] for r in rows(out)) <= 8
    monkeypatch.delenv("JAXGPT_FAULT")
    run_training(tiny(data_dir, out, max_steps=12), quiet=True)  # resumes from the good step 4
    assert curve(out) == curve(ref, upto=12)


def test_nan_skip_keeps_the_state_marks_the_rows_and_stops_after_max_skips(data_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    cfg = tiny(data_dir, out, max_steps=8, save_interval=2, keep=10, nan_policy="skip", nan_max_skips=3)
    monkeypatch.setenv("JAXGPT_FAULT", "nan_at=3-4")
    run_training(cfg, quiet=True)
    assert list_steps(out) == [2, 4, 6, 8]
    marked = {r["step"]: r for r in rows(out) if r.get("skipped")}
    assert sorted(marked) == [3, 4] and marked[4]["skipped_total"] == 2
    assert marked[3]["train_loss"] is None and "val_loss" not in marked[3]  # NaN is written as null
    # two skipped updates: params and optimizer state exactly those of step 2
    assert_same_params(model_params(load_model(out, 2)[0]), model_params(load_model(out, 4)[0]))
    import orbax.checkpoint as ocp
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as c:
        t2, t4 = (c.restore(os.path.join(out, str(s), "train")) for s in (2, 4))
    assert_same_params(t2["opt_state"], t4["opt_state"]) and int(t4["step"]) == 4
    assert np.isfinite(rows(out)[-1]["train_loss"])

    monkeypatch.setenv("JAXGPT_FAULT", "nan_at=9-16")
    with pytest.raises(faults.NonFiniteStop, match="3 consecutive steps skipped"):
        run_training(dataclasses.replace(cfg, max_steps=16), quiet=True)
    assert max(list_steps(out)) == 10  # no final save once it stopped at step 11


def test_a_nan_val_loss_is_never_the_best():
    good = {"metrics": {"val_loss": 2.0}, "config": {"task": "lm"}}
    nan = {"metrics": {"val_loss": float("nan")}, "config": {"task": "lm"}}
    assert ckpt.metric_of(nan) is None and ckpt._best_first({4: good, 8: nan}) == [4, 8]
    assert ckpt._best_first({8: good, 4: {"metrics": {"val_loss": float("inf")}}}) == [8, 4]


# ----------------------------------------------------------------------------- the disk

def test_a_full_disk_is_one_line_and_keeps_the_only_intact_checkpoint(data_dir, tmp_path, capsys,
                                                                      monkeypatch, caplog):
    out = str(tmp_path / "run")
    monkeypatch.setenv("JAXGPT_FAULT", "enospc_at=8")
    with caplog.at_level(logging.WARNING):
        code, err = _err(capsys, ["train", *cli_args(data_dir, out, max_steps=12, keep=1)])
    assert code == 2
    _one_line_error(err, "could not write checkpoint step 8")
    assert "the disk is full" in err and "the latest checkpoint is step 4, intact" in err
    assert not [r for r in caplog.records if r.name == "absl"]  # Orbax's ERROR + traceback: silenced
    assert list_steps(out) == [4] and not _tmp_dirs(out)  # keep=1 never dropped the only good one
    assert load_model(out)[2]["step"] == 4


def test_an_interrupted_reprepare_is_refused_until_prepare_runs_again(tmp_path, monkeypatch):
    src = tmp_path / "a.txt"
    src.write_text("first corpus " * 50)
    out = str(tmp_path / "data")
    prepare(str(src), out, tokenizer="byte", quiet=True)
    src.write_text("a second, longer corpus " * 80)
    real, calls = os.replace, []

    def killed_after_one(a, b):  # the process dies once train.bin is replaced, val.bin not yet
        if calls:
            raise KeyboardInterrupt
        calls.append(b)
        return real(a, b)

    import jaxgpt.prepare
    monkeypatch.setattr(jaxgpt.prepare.os, "replace", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(src), out, tokenizer="byte", quiet=True)
    monkeypatch.setattr(jaxgpt.prepare.os, "replace", real)
    assert not os.path.exists(os.path.join(out, "meta.json"))  # a bare train.bin is a nanoGPT folder...
    with pytest.raises(UserError, match="interrupted `jaxgpt prepare`; run it again"):
        load_meta(out)  # ...but not this one
    prepare(str(src), out, tokenizer="byte", quiet=True)
    assert load_meta(out)["train_tokens"] > 1000 and not os.path.exists(os.path.join(out, ".prepare-incomplete"))


# ----------------------------------------------------------------------------- damaged checkpoints

@pytest.fixture(scope="module")
def run8(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run8") / "run")
    run_training(tiny(data_dir, out, max_steps=8), quiet=True)
    assert list_steps(out) == [4, 8]
    return out


def _largest_array(step_dir, item="params"):
    files = [p for p in glob.glob(os.path.join(step_dir, item, "**", "d", "*"), recursive=True)]
    return max(files, key=os.path.getsize)


def _truncate(path, size=100):
    with open(path, "r+b") as f:
        f.truncate(size)


def _flip(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


DAMAGE = {
    "truncated array": (lambda d: _truncate(_largest_array(d)), "truncated"),
    "deleted array": (lambda d: os.remove(_largest_array(d)), "is missing"),
    "flipped bit": (lambda d: _flip(_largest_array(d)), "does not match its checksum"),
    "missing item": (lambda d: shutil.rmtree(os.path.join(d, "params")), "params item is missing"),
    "bad metadata JSON": (lambda d: _truncate(os.path.join(d, "meta", "metadata")), "metadata is unreadable"),
    "truncated, no manifest": (lambda d: (_truncate(_largest_array(d)), os.remove(os.path.join(d, ckpt.MANIFEST))),
                               "could not restore its params"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_or_skipped(run8, tmp_path, capsys, damage):
    out = str(tmp_path / "run")
    shutil.copytree(run8, out)
    hurt, needle = DAMAGE[damage]
    hurt(os.path.join(out, "8"))
    with pytest.raises(UserError, match=f"step 8 is damaged: .*{needle}") as e:
        load_model(out, 8)
    assert "\n" not in str(e.value)
    capsys.readouterr()
    assert load_model(out)[2]["step"] == 4  # without a step: the newest intact one...
    warn = capsys.readouterr().err.strip()
    assert warn.startswith("warning:") and "step 8" in warn and len(warn.splitlines()) == 1  # ...said once
    if damage not in ("flipped bit", "truncated, no manifest"):  # (only the CRC / a restore tell)
        assert max(ckpt.Resume(out).ok) == 4  # resume's cheap scan already skips it


def test_a_damaged_latest_checkpoint_commands_and_resume(data_dir, ref, run8, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(run8, out)
    _truncate(_largest_array(os.path.join(out, "8")))
    os.remove(os.path.join(out, "8", ckpt.MANIFEST))  # only a real restore attempt can tell
    for argv in (["eval", "--ckpt", out, "--step", "8"],
                 ["generate", "--ckpt", out, "--step", "8", "--prompt", "x", "--max-new-tokens", "2"],
                 ["convert", "--to-hf", out, "--step", "8", "--out", str(tmp_path / "hf")]):
        code, err = _err(capsys, argv)
        assert code == 2 and len(err.splitlines()) == 1, err
        _one_line_error(err, "step 8 is damaged: could not restore its params")
    assert not (tmp_path / "hf").exists()
    capsys.readouterr()
    assert main(["eval", "--ckpt", out, "--json"]) == 0
    got = capsys.readouterr()
    assert json.loads(got.out.strip().splitlines()[-1])["step"] == 4  # the newest intact one
    assert got.err.startswith("warning: skipping damaged checkpoint") and "step 8" in got.err

    capsys.readouterr()
    run_training(tiny(data_dir, out, max_steps=12), quiet=True)
    err = capsys.readouterr().err
    assert "checkpoint step 8" in err and "moved it to 8.damaged; resuming from step 4" in err
    assert os.path.isdir(os.path.join(out, "8.damaged")) and list_steps(out) == [8, 12]
    assert curve(out) == curve(ref, upto=12)  # rows 5..8 of the dead timeline were replaced


def test_stale_temporary_and_deleting_folders_are_not_checkpoints(data_dir, run8, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(run8, out)
    os.makedirs(os.path.join(out, "12.orbax-checkpoint-tmp-1234", "params"))
    shutil.copytree(os.path.join(out, "4"), os.path.join(out, ".deleting-4-abc"))
    assert list_steps(out) == [4, 8] and read_meta(out, 8)[0] == 8
    run_training(tiny(data_dir, out, max_steps=12), quiet=True)
    assert sorted(os.listdir(out)) == ["12", "8", "loss.png", "metrics.jsonl"]


def test_no_absl_warnings_when_reading(run8, caplog):
    with caplog.at_level(logging.INFO):
        load_model(run8)
        read_meta(run8)
        list_steps(run8)
    assert not [r for r in caplog.records if r.name == "absl" and r.levelno >= logging.WARNING]


# ----------------------------------------------------------------------------- bad inputs

def _train_err(capsys, data, out, *extra):
    code, err = _err(capsys, ["train", *cli_args(data, out, max_steps=2), *extra])
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_data_folders(data_dir, tmp_path, capsys):
    odd = str(tmp_path / "odd")
    shutil.copytree(data_dir, odd)
    with open(os.path.join(odd, "train.bin"), "ab") as f:
        f.write(b"\x01")
    assert "not a whole number of uint16 tokens" in _train_err(capsys, odd, tmp_path / "o1")

    wide = str(tmp_path / "wide")
    shutil.copytree(data_dir, wide)
    tokens = np.fromfile(os.path.join(wide, "train.bin"), np.uint16)
    tokens[123] = 300  # the byte vocabulary has 257 ids
    tokens.tofile(os.path.join(wide, "train.bin"))
    assert "holds token id 300, outside the vocabulary of 257 ids" in _train_err(capsys, wide, tmp_path / "o2")
    # a nanoGPT-style folder (no meta.json) is scanned the same way
    os.remove(os.path.join(wide, "meta.json"))
    with pytest.raises(UserError, match="outside the vocabulary"):
        tokens[123] = 60000
        tokens.tofile(os.path.join(wide, "train.bin"))
        load_meta(wide)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()  # nothing written


def test_foreign_and_future_checkpoints(data_dir, run8, tmp_path, capsys):
    import orbax.checkpoint as ocp
    foreign = str(tmp_path / "foreign")
    m = ocp.CheckpointManager(foreign, item_names=("state",))  # another program's checkpoint
    m.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.ones(3)})))
    m.close()
    before = sorted(os.listdir(foreign))
    code, err = _err(capsys, ["eval", "--ckpt", foreign])
    assert code == 2 and len(err.splitlines()) == 1
    _one_line_error(err, "step 3 is not a jaxgpt checkpoint")
    assert "step 3 is not a jaxgpt checkpoint" in _train_err(capsys, data_dir, tmp_path / "o", f"init_from={foreign}")
    assert "step 3 is not a jaxgpt checkpoint" in _train_err(capsys, data_dir, foreign)
    assert sorted(os.listdir(foreign)) == before

    future = str(tmp_path / "future")
    shutil.copytree(run8, future)
    path = os.path.join(future, "8", "meta", "metadata")
    meta = json.load(open(path))
    json.dump({**meta, "format": "jaxgpt-ckpt-2", "jaxgpt_version": "9.0"}, open(path, "w"))
    code, err = _err(capsys, ["eval", "--ckpt", future])
    assert code == 2
    _one_line_error(err, "written by jaxgpt 9.0 in format jaxgpt-ckpt-2")
    assert "upgrade jaxgpt" in _train_err(capsys, data_dir, future)
    assert list_steps(future) == [4, 8]  # nothing moved aside


def test_init_from_a_file_and_unwritable_out_folders(data_dir, tmp_path, capsys):
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"\0" * 64)
    assert "is a file, not a checkpoint folder" in _train_err(capsys, data_dir, tmp_path / "o", f"init_from={a_file}")
    assert "exists and is not a folder" in _train_err(capsys, data_dir, a_file)
    assert "cannot create the out folder" in _train_err(capsys, data_dir, a_file / "run")  # under a file
    assert "cannot" in _train_err(capsys, data_dir, "/proc/jaxgpt-test-run")  # not even root writes /proc
    assert a_file.read_bytes() == b"\0" * 64 and not (tmp_path / "o").exists()
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert "not writable" in _train_err(capsys, data_dir, ro)


def test_prompt_ids_out_of_range_and_non_utf8_prompt_files(run8, tmp_path, capsys):
    import jaxgpt
    model, tok = jaxgpt.load(run8)
    for bad in ([[257]], [[-1]], [[1, 2.5]]):
        with pytest.raises(UserError, match="not in the vocabulary"):
            jaxgpt.generate(model, bad, 2)
    with pytest.raises(UserError, match="not in the vocabulary"):
        jaxgpt.logits(model, [[1, 300]])
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"caf\xe9\n")  # Latin-1, not UTF-8
    code, err = _err(capsys, ["generate", "--ckpt", run8, "--prompt-file", str(bad)])
    assert code == 2 and len(err.splitlines()) == 1
    _one_line_error(err, "could not read prompt file")


@pytest.mark.parametrize("body", ["raise RuntimeError('boom')", "1 / 0", "import no_such_module"])
def test_a_config_file_that_raises(data_dir, tmp_path, capsys, body):
    cfg = tmp_path / "bad.py"
    cfg.write_text(body + "\noverrides = {}\n")
    code, err = _err(capsys, ["train", "--config", str(cfg)])
    assert code == 2 and len(err.splitlines()) == 1
    _one_line_error(err, "could not read config")


def test_a_config_file_that_calls_sys_exit(tmp_path, capsys):
    cfg = tmp_path / "exits.py"
    cfg.write_text("import sys\nsys.exit(0)\n")
    code, err = _err(capsys, ["train", "--config", str(cfg)])
    assert code == 2
    _one_line_error(err, "could not read config")


# ----------------------------------------------------------------------------- metrics.jsonl

def test_metrics_rows_after_the_restored_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train_loss": 1.0 / s}) + "\n" for s in (2, 4, 6, 8))
                    + "12\n" + '{"step": 10, "train_lo')  # not a row; a line cut by a kill
    log = MetricsLogger(str(tmp_path), 4, {}, False, False)  # e.g. a fallback from step 8 to step 4
    assert [r["step"] for r in log.rows] == [2, 4] and [r["step"] for r in rows(tmp_path)] == [2, 4]
    log.mark_skipped(5, own_row=True, train_loss=float("nan"), grad_norm=float("inf"), skipped_total=1)
    log.mark_skipped(6, own_row=False, train_loss=float("nan"), grad_norm=1.0, skipped_total=2)
    log.log({"step": 6, "train_loss": np.float32("nan"), "lr": 0.1})
    got = rows(tmp_path)[2:]
    assert got == [{"step": 5, "train_loss": None, "grad_norm": None, "skipped_total": 1, "skipped": True},
                   {"step": 6, "train_loss": None, "lr": 0.1, "grad_norm": 1.0, "skipped_total": 2,
                    "skipped": True}]
