"""scripts/device_check.sh --dry-run: the GPU check's code paths on tiny shapes, on this CPU.

The real check (on a GPU) runs the same benchmark functions at GPT-2 124M; this keeps them from
rotting between the sessions that have a GPU."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_bench_accel_dry_run_train_and_generate(tmp_path):
    """The default suite's share: the train step and decode measurements on tiny shapes."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_accel.py"), "train", "generate",
                        "--dry-run", "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "bench_accel.jsonl")]
    assert rows and all("error" not in row for row in rows), rows
    assert {row["bench"] for row in rows} == {"train_dry", "generate_dry"}


@pytest.mark.slow  # the whole script, mesh and decoding rows included (CI's slow pass)
def test_device_check_dry_run_writes_every_measurement(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "device_check.sh"), str(tmp_path), "--dry-run"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "bench_accel.jsonl")]
    assert all("error" not in row for row in rows), [row for row in rows if "error" in row]
    train = [row for row in rows if row["bench"] == "train_dry"]
    gen = [row for row in rows if row["bench"] == "generate_dry"]
    assert train and all(row["tokens_per_s"] > 0 and row["loss"] > 0 for row in train)
    # bf16 on the default backend, and float32 on both decode layouts (xla, cpu kernels)
    assert {(row["dtype"], row["backend"]) for row in gen} == {
        ("bfloat16", "xla"), ("float32", "xla"), ("float32", "cpu")}
    assert all(row["ms_per_step"] > 0 and row["roofline_ms_3_35"] > 0 for row in gen)
    mesh = {row["parallel"]: row for row in rows if row["bench"] == "train_mesh_dry"}
    assert set(mesh) == {"pmap", "mesh"} and all(r["tokens_per_s"] > 0 for r in mesh.values())
    assert abs(mesh["pmap"]["loss"] - mesh["mesh"]["loss"]) < 1e-2  # the same step, the same batch
    dec = [row for row in rows if row["bench"] == "decoding_dry"]
    assert {row["what"] for row in dec} == {"int8", "beam4", "speculative"}
    spec = {row["draft"]: row for row in dec if row["what"] == "speculative"}
    assert spec["self_draft"]["accept_rate"] == 1.0  # the target as its own draft accepts everything


def test_device_check_rejects_a_bad_flag(tmp_path):
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "device_check.sh"), str(tmp_path), "--nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr
