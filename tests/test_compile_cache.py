"""The CLI's persistent compilation cache (jaxgpt/compile_cache.py): a second run loads every
program the first one compiled, and computes the same thing."""

import json
import os
import subprocess
import sys

import pytest

from jaxgpt import compile_cache
from jaxgpt.errors import UserError
from jaxgpt.prepare import prepare

TEXT = "".join(f"def g{i}(y):\n    return y - {i} * {i % 5}\n\n" for i in range(300))
TRAIN = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16",
         "batch_size=4", "max_steps=3", "warmup_steps=1", "decay_steps=3", "log_interval=1",
         "eval_interval=3", "eval_steps=1", "save_interval=3"]


def test_the_setting_names_a_folder_or_off(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve("auto") == str(tmp_path / "xdg" / "jaxgpt" / "xla")
    assert compile_cache.resolve(None) == compile_cache.resolve("auto")
    assert compile_cache.resolve("off") is None and compile_cache.resolve("OFF ") is None
    assert compile_cache.resolve(str(tmp_path / "c")) == str(tmp_path / "c")
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="is not a folder"):
        compile_cache.resolve(str(tmp_path / "f"))


def _train(data, out, cache):
    # Every program is written, however fast it compiled: with a time threshold, a program
    # that compiled just under it in one run and just over it in the next (a loaded machine)
    # would appear as a new entry.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", JAXGPT_COMPILE_CACHE=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return subprocess.run([sys.executable, "-m", "jaxgpt", "train", f"data={data}", f"out={out}", *TRAIN],
                          env=env, capture_output=True, text=True, timeout=300)


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "mfu")}
                for line in f]


PROGRAM = """
from jaxgpt import compile_cache
compile_cache.MIN_COMPILE_S = 0.0  # write even this small program
print(compile_cache.enable())
import jax, jax.numpy as jnp
x = jnp.arange(64.0).reshape(8, 8)
print(float(jax.jit(lambda a: jnp.tanh(a) @ a.T)(x).sum()))
"""


def _python(cache):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", JAXGPT_COMPILE_CACHE=str(cache))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    cache = tmp_path / "cache"
    first = _python(cache)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.splitlines()[0] == str(cache)
    # JAX reports a cache it cannot use only as a warning (e.g. a size cap without filelock)
    assert "compilation cache" not in first.stderr, first.stderr[-2000:]
    entries = sorted(os.listdir(cache))
    assert entries  # the jitted program was written
    second = _python(cache)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert "compilation cache" not in second.stderr, second.stderr[-2000:]
    assert sorted(os.listdir(cache)) == entries  # loaded, not compiled and written again
    off = _python("off")
    assert off.returncode == 0 and off.stdout.splitlines()[0] == "None"


def test_a_cache_path_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT)
    bad = _train(tmp_path / "no_data", tmp_path / "d", tmp_path / "corpus.txt")
    assert bad.returncode == 2 and not os.path.exists(tmp_path / "d")
    assert bad.stderr.strip().count("\n") == 0 and "is not a folder" in bad.stderr, bad.stderr


@pytest.mark.slow  # three CLI training runs (~40 s); the two tests above are its fast siblings
def test_a_second_cli_run_compiles_nothing_and_computes_the_same(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT)
    data = str(tmp_path / "data")
    prepare(str(tmp_path / "corpus.txt"), data, tokenizer="byte", quiet=True)
    cache = tmp_path / "cache"

    first = _train(data, tmp_path / "a", cache)
    assert first.returncode == 0, first.stderr[-2000:]
    entries = sorted(os.listdir(cache))
    # init, train step, eval step, prefill, decode state, decode weights, decode loop
    assert len(entries) >= 5, entries

    second = _train(data, tmp_path / "b", cache)
    assert second.returncode == 0, second.stderr[-2000:]
    assert sorted(os.listdir(cache)) == entries  # every program came from the cache
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")
    assert first.stdout.split("---- sample")[1] == second.stdout.split("---- sample")[1]

    off = _train(data, tmp_path / "c", "off")
    assert off.returncode == 0 and sorted(os.listdir(cache)) == entries
