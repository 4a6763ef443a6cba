"""End to end against nanoGPT itself: its own train.py with the CPU command from its README, and
`jaxgpt train --config configs/shakespeare_char_cpu.py eval_steps=20`, run one after the other
on this machine on Tiny Shakespeare. Prints one JSON line per run.

    PYTHONPATH=. python scripts/bench_nanogpt.py --nanogpt /path/to/nanoGPT \\
        --text /path/to/tinyshakespeare.txt [--repeats 2]

--nanogpt is a checkout of https://github.com/karpathy/nanoGPT kept outside this repo (it needs
torch and numpy). Both datasets are prepared from --text when missing: nanoGPT's
data/shakespeare_char/prepare.py gets the text as its input.txt (so it downloads nothing), and
jaxgpt's data/shakespeare_char comes from `jaxgpt prepare --tokenizer byte`. With --repeats 2
the order alternates (nanoGPT, jaxgpt, jaxgpt, nanoGPT) so a machine whose speed drifts favours
neither. Each jaxgpt run trains into a fresh out= folder, so nothing is resumed.

Per run: wall_s (process start to exit), cpu_s (its user + system CPU time, all threads: less
sensitive than wall_s to other load on a shared machine), startup_s (start to the first step's
output),
median_ms_per_iter (nanoGPT: its `iter N: ... time` lines; jaxgpt: tokens_per_s of the rows of
metrics.jsonl), final_val_loss, and the load averages before and after (the machine is shared:
compare runs made back to back, not across sessions), and for jaxgpt compile_cache: cold (its
persistent compilation cache was empty: every program compiled), warm (loaded from the earlier
run's cache), or off. --compile-cache fresh (the default) gives each invocation a new cache
folder, so with --repeats 2 the order is nanoGPT, jaxgpt cold, jaxgpt warm, nanoGPT. Not part of
the test suite: it takes minutes and needs torch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# nanoGPT README, "I only have a macbook" (CPU), with eval_iters 20 and 2000 iterations.
def nanogpt_args(iters: int) -> list[str]:
    return ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
            "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12",
            "--n_layer=4", "--n_head=4", "--n_embd=128", f"--max_iters={iters}",
            f"--lr_decay_iters={iters}", "--dropout=0.0"]


def jaxgpt_args(iters: int) -> list[str]:
    extra = [] if iters == 2000 else [f"max_steps={iters}", f"decay_steps={iters}"]
    return ["train", "--config", "configs/shakespeare_char_cpu.py", "eval_steps=20", *extra]


def _run(cmd: list[str], cwd: str, log_path: str, first_step: re.Pattern, env_extra=None) -> dict:
    """Run cmd; timestamp its output (split on \\n and \\r, for tqdm) as it arrives."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    load_before = os.getloadavg()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    lines: list[tuple[float, str]] = []

    def reader():
        buf = b""
        while True:
            chunk = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(1)
            now = time.perf_counter() - t0
            if not chunk:
                break
            buf += chunk
            parts = re.split(rb"[\r\n]", buf)
            buf = parts.pop()
            lines.extend((now, p.decode("utf-8", "replace")) for p in parts if p.strip())
        if buf.strip():
            lines.append((time.perf_counter() - t0, buf.decode("utf-8", "replace")))

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    th.join()
    with open(log_path, "w") as f:
        f.writelines(f"{t:9.3f} {s}\n" for t, s in lines)
    if rc != 0:
        tail = "\n".join(s for _, s in lines[-15:])
        raise SystemExit(f"{' '.join(cmd)} exited {rc} (log: {log_path}):\n{tail}")
    startup = next((t for t, s in lines if first_step.search(s)), None)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "startup_s": None if startup is None else round(startup, 2),
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()], "_lines": lines}


def prepare_nanogpt(nanogpt: str, text: str, python: str) -> None:
    d = os.path.join(nanogpt, "data", "shakespeare_char")
    if all(os.path.exists(os.path.join(d, f)) for f in ("train.bin", "val.bin", "meta.pkl")):
        return
    shutil.copyfile(text, os.path.join(d, "input.txt"))  # prepare.py downloads only if absent
    subprocess.run([python, "prepare.py"], cwd=d, check=True, stdout=subprocess.DEVNULL)


def prepare_jaxgpt(root: str, text: str, python: str) -> None:
    if os.path.exists(os.path.join(root, "data", "shakespeare_char", "meta.json")):
        return
    subprocess.run([python, "-m", "jaxgpt", "prepare", "--input", text, "--out",
                    "data/shakespeare_char", "--tokenizer", "byte"], cwd=root, check=True,
                   stdout=subprocess.DEVNULL)


def run_nanogpt(nanogpt: str, python: str, log_dir: str, i: int, iters: int) -> dict:
    r = _run([python, "train.py", *nanogpt_args(iters)], nanogpt, os.path.join(log_dir, f"nanogpt_{i}.log"),
             re.compile(r"^iter 0:"))
    iters = [float(m.group(1)) for _, s in r["_lines"] if (m := re.search(r"^iter \d+: .*time ([\d.]+)ms", s))]
    vals = [float(m.group(1)) for _, s in r["_lines"] if (m := re.search(r"val loss ([\d.]+)", s))]
    r.update(median_ms_per_iter=round(statistics.median(iters[1:]), 2) if len(iters) > 1 else None,
             iters=len(iters), final_val_loss=vals[-1] if vals else None)
    return r


def run_jaxgpt(root: str, python: str, log_dir: str, i: int, iters: int, extra: list[str],
               cache: str) -> dict:
    out = tempfile.mkdtemp(prefix=f"jaxgpt_bench_{i}_", dir=log_dir)
    state = "off" if cache == "off" else ("warm" if os.path.isdir(cache) and os.listdir(cache) else "cold")
    r = _run([python, "-m", "jaxgpt", *jaxgpt_args(iters), f"out={out}", *extra], root,
             os.path.join(log_dir, f"jaxgpt_{i}.log"), re.compile(r"\b[1-9]\d*/\d+ \["),
             {"JAXGPT_COMPILE_CACHE": cache})
    r["compile_cache"] = state
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    kv = dict(x.split("=", 1) for x in extra if "=" in x)
    tokens_per_step = int(kv.get("batch_size", 12)) * int(kv.get("model.block_size", 64))  # preset: 12 x 64
    tps = [row["tokens_per_s"] for row in rows if row.get("tokens_per_s")]
    vals = [row["val_loss"] for row in rows if row.get("val_loss") is not None]
    r.update(median_ms_per_iter=round(statistics.median(1000 * tokens_per_step / t for t in tps), 2) if tps else None,
             iters=max((row["step"] for row in rows), default=0),
             final_val_loss=round(vals[-1], 4) if vals else None)
    shutil.rmtree(out, ignore_errors=True)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanogpt", required=True, help="a nanoGPT checkout (outside this repo)")
    ap.add_argument("--text", required=True, help="Tiny Shakespeare as one text file")
    ap.add_argument("--repeats", type=int, default=1, help="pairs of runs; the order alternates")
    ap.add_argument("--only", choices=["nanogpt", "jaxgpt"], help="run one program only")
    ap.add_argument("--iters", type=int, default=2000,
                    help="training iterations of both (2000 is the comparison; fewer: a smoke run)")
    ap.add_argument("--nanogpt-python", default=sys.executable, help="interpreter with torch")
    ap.add_argument("--log-dir", default=None, help="where run logs go (default: a temp folder)")
    ap.add_argument("--compile-cache", default="fresh",
                    help="jaxgpt's JAXGPT_COMPILE_CACHE: fresh (default: a new folder in the log dir, so "
                         "the first jaxgpt run compiles everything and later ones load it), off, or a folder")
    ap.add_argument("jaxgpt_overrides", nargs="*", metavar="key=value",
                    help="extra jaxgpt train overrides (the comparison itself uses none)")
    args = ap.parse_args()
    nanogpt, text = os.path.abspath(args.nanogpt), os.path.abspath(args.text)
    if not os.path.isfile(os.path.join(nanogpt, "train.py")):
        ap.error(f"{nanogpt} is not a nanoGPT checkout (no train.py)")
    log_dir = os.path.abspath(args.log_dir or tempfile.mkdtemp(prefix="bench_nanogpt_"))
    os.makedirs(log_dir, exist_ok=True)
    if args.only != "jaxgpt":
        prepare_nanogpt(nanogpt, text, args.nanogpt_python)
    if args.only != "nanogpt":
        prepare_jaxgpt(ROOT, text, sys.executable)
    cache = os.path.join(log_dir, "xla_cache") if args.compile_cache == "fresh" else args.compile_cache
    order = []
    for i in range(args.repeats):
        pair = ["nanogpt", "jaxgpt"] if i % 2 == 0 else ["jaxgpt", "nanogpt"]
        order += [(p, i) for p in pair if args.only in (None, p)]
    for prog, i in order:
        if prog == "nanogpt":
            r = run_nanogpt(nanogpt, args.nanogpt_python, log_dir, i, args.iters)
        else:
            r = run_jaxgpt(ROOT, sys.executable, log_dir, i, args.iters, args.jaxgpt_overrides, cache)
        r.pop("_lines")
        print(json.dumps({"program": prog, "run": i, **r, "log_dir": log_dir}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
