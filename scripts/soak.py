"""Soak test for issue #16: does a long run's memory stay flat?

    PYTHONPATH=. python scripts/soak.py [--steps 10000] [--from-step 1000] [--workdir DIR]

Runs `jaxgpt train --config configs/tiny.py` for `--steps` steps (one CPU device) with the
preset's logging (every 5 steps), eval (every 10) and saving (every 10, keep 2; each eval also
redraws loss.png) on a small byte-level slice of the Python standard library, samples the
process's RSS (/proc/PID/status VmRSS) twice a second against the step metrics.jsonl has
reached, and prints one JSON line: RSS at `--from-step` and at the end, the growth between them
(target: <= 50 MB), the peak in between, the RSS at exit (after the end-of-run sample, whose
generation compiles its own programs), and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def last_step(path: str) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--from-step", type=int, default=1_000)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--target-mb", type=float, default=50.0)
    args = ap.parse_args()
    work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="jaxgpt-soak-"))
    os.makedirs(work, exist_ok=True)
    data, out = os.path.join(work, "data"), os.path.join(work, "run")
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=ROOT)
    if not os.path.exists(os.path.join(data, "meta.json")):
        subprocess.run([sys.executable, "-m", "jaxgpt", "prepare", "--input", "stdlib", "--out", data,
                        "--tokenizer", "byte", "--quiet"], env=env, check=True)
    t0 = time.time()
    p = subprocess.Popen([sys.executable, "-m", "jaxgpt", "train", "--config",
                          os.path.join(ROOT, "configs", "tiny.py"), f"data={data}", f"out={out}",
                          f"max_steps={args.steps}"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = []  # (seconds, step, rss MB)
    metrics = os.path.join(out, "metrics.jsonl")
    while p.poll() is None:
        r = rss_mb(p.pid)
        if r is not None:
            samples.append((time.time() - t0, last_step(metrics), r))
        time.sleep(0.5)
    if p.returncode != 0:
        print(json.dumps({"error": f"the run exited {p.returncode}"}))
        return 1
    train = [s for s in samples if s[1] >= 1]
    at_from = next((s for s in train if s[1] >= args.from_step), None)
    # the end of training: the first sample once the last step is logged (after it, the run
    # only saves, closes and prints its sample, whose generation compiles: not the loop's memory)
    at_end = next((s for s in train if s[1] >= args.steps), train[-1])
    growth = at_end[2] - at_from[2] if at_from else None
    result = {
        "steps": args.steps, "from_step": at_from[1] if at_from else None,
        "rss_mb_at_from": round(at_from[2], 1) if at_from else None,
        "end_step": at_end[1], "rss_mb_at_end": round(at_end[2], 1),
        "growth_mb": round(growth, 1) if growth is not None else None,
        "peak_mb_from_to_end": round(max(s[2] for s in train if args.from_step <= s[1] < args.steps), 1)
        if at_from else None,
        "rss_mb_at_exit": round(train[-1][2], 1),
        "rss_mb_at_step_1": round(train[0][2], 1) if train else None,
        "target_mb": args.target_mb, "ok": growth is not None and growth <= args.target_mb,
        "samples": len(samples), "seconds": round(time.time() - t0, 1),
        "checkpoints": sorted(int(n) for n in os.listdir(out) if n.isdigit()),
    }
    # the RSS curve at every 1000 steps, for the record
    curve = {}
    for _, step, r in train:
        curve.setdefault(step // 1000 * 1000, round(r, 1))
    result["rss_mb_by_1000_steps"] = curve
    print(json.dumps(result), flush=True)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
