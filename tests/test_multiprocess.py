"""Multi-process training for real: two processes on localhost, 4 CPU devices each.

They join through `distributed=on` (a free port as coordinator), train parallel=mesh
mesh.fsdp=8 and save collectively. Their logged losses must equal one 8-device process's, and
their checkpoint must resume in one process to the step they took next. A process whose
coordinator never answers must stop with one line within its timeout.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxgpt.checkpoint import list_steps
from jaxgpt.config import Config, MeshConfig, ModelConfig
from jaxgpt.prepare import prepare
from jaxgpt.train.loop import run_training

TEXT = "".join(f"def g{i}(y):\n    return y - {i} * {i % 5}\n\n" for i in range(300))
MODEL = dict(block_size=32, n_layer=2, n_head=2, n_embd=32)
KEYS = dict(batch_size=16, max_steps=6, warmup_steps=2, decay_steps=8, log_interval=1, eval_interval=100,
            eval_steps=1, save_interval=3, keep=5, seed=7, parallel="mesh")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mpdata")
    (d / "corpus.txt").write_text(TEXT)
    prepare(str(d / "corpus.txt"), str(d / "byte"), tokenizer="byte", quiet=True)
    return str(d / "byte")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXGPT_DISTRIBUTED_TIMEOUT="90",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def _cli(data, out, **extra) -> list[str]:
    keys = {**{f"model.{k}": v for k, v in MODEL.items()}, **KEYS, "data": data, "out": out,
            "mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1, **extra}
    return [sys.executable, "-m", "jaxgpt", "train", *(f"{k}={v}" for k, v in keys.items())]


def _losses(out) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r["step"] for r in rows if "train_loss" in r]
    assert len(steps) == len(set(steps)), steps  # one writer: process 0
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def _config(data, out, **kw) -> Config:
    return Config(model=ModelConfig(**MODEL), data=data, out=out, mesh=MeshConfig(data=1, fsdp=8, tensor=1),
                  **{**KEYS, **kw})


@pytest.mark.slow
def test_two_processes_train_as_one_and_their_checkpoint_resumes_in_one(data_dir, tmp_path):
    out2 = str(tmp_path / "two")
    port = _free_port()
    procs = [subprocess.Popen(_cli(data_dir, out2, distributed="on", coordinator=f"127.0.0.1:{port}",
                                   num_processes=2, process_id=i),
                              env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    # meanwhile, the same run in this process on its 8 devices
    out1 = str(tmp_path / "one")
    run_training(_config(data_dir, out1), quiet=True)
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    printed = [[line for line in out.splitlines() if not line.startswith("[Gloo]")] for out, _ in outputs]
    assert any(line.startswith("model:") for line in printed[0]) and printed[1] == []  # only process 0 reports

    two, one = _losses(out2), _losses(out1)
    assert sorted(two) == list(range(1, 7))
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-6)
    assert list_steps(out2) == [3, 6]

    # the 2-process checkpoint of step 3, resumed by one process: its step 4 is theirs
    out3 = str(tmp_path / "resumed")
    shutil.copytree(out2, out3)
    shutil.rmtree(os.path.join(out3, "6"))
    run_training(_config(data_dir, out3, max_steps=4), quiet=True)
    np.testing.assert_allclose(_losses(out3)[4], two[4], rtol=1e-6)


def test_an_unreachable_coordinator_is_one_line_within_the_timeout(data_dir, tmp_path):
    env = dict(_env(4), JAXGPT_DISTRIBUTED_TIMEOUT="3")
    t0 = time.monotonic()
    p = subprocess.run(_cli(data_dir, str(tmp_path / "o"), distributed="on",
                            coordinator=f"127.0.0.1:{_free_port()}", num_processes=2, process_id=1),
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: could not join the cluster through 127.0.0.1:")
    assert "within 3 s" in err
    assert time.monotonic() - t0 < 60  # the 3 s timeout plus start-up, not JAX's 300 s default
