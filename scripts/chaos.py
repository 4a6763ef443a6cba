"""Fault-injection harness for issue #16: kill a `tiny` run over and over, resume it every time,
and check that it ends exactly where an uninterrupted run ends.

    PYTHONPATH=. python scripts/chaos.py [--kills 30] [--seed 0] [--steps 200] [--workdir DIR]

What it does, all with `jaxgpt train --config configs/tiny.py` (dropout 0.1, save_interval 5,
log_interval 1, eval_interval 10) on a small byte-level slice of the Python standard library:
1. an uninterrupted reference run, keeping every checkpoint;
2. `--kills` SIGKILLs at seeded random points, each followed by a `resume=auto` run: during
   start-up, during a step (a random moment after a new metrics row), and inside a checkpoint
   write (after Orbax's temporary folder appears, while the test-only `save_delay` fault point
   holds the write open before its commit). A few runs get SIGTERM instead (must save, exit 75);
3. injected between kills: a truncated array file in the newest checkpoint (resume must report it,
   move it aside and fall back), a NaN batch (nan_policy=stop must name the step, exit 3, save
   nothing from it), ENOSPC at the writer (a one-line error, the earlier checkpoints intact), a
   real full disk (a small tmpfs, when this process may mount one), a concurrent second run on
   the same folder (refused by the lock, naming the first one's PID), and nan_policy=skip on a
   scratch copy;
4. after every kill, the newest checkpoint must restore and equal the reference's params at
   that step bit for bit; at the end, every metrics.jsonl row (train loss, val loss, lr, grad
   norm of each step) and the final params must equal the reference's.

It prints one JSON line: kills (by kind), resumes, steps lost (max, mean), mismatches (must be
0), corrupt checkpoints detected, silent failures (must be 0: a checkpoint accepted but wrong, a
fault not reported, a traceback, a wrong exit status), and the wall time. All runs use one
simulated CPU device and share a persistent compilation cache, so only the first one compiles.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

SAVE_INTERVAL = 5
KEYS = ("train_loss", "val_loss", "eval_train_loss", "lr", "grad_norm")


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Harness:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="jaxgpt-chaos-"))
        os.makedirs(os.path.join(self.work, "logs"), exist_ok=True)
        self.data = os.path.join(self.work, "data")
        self.out = os.path.join(self.work, "run")
        self.ref = os.path.join(self.work, "ref")
        self.cache = os.path.join(self.work, "jax-cache")
        self.n_runs = 0
        self.c = {"kills": 0, "kills_at_startup": 0, "kills_in_step": 0, "kills_in_save": 0,
                  "sigterms": 0, "resumes": 0, "steps_lost": [], "mismatches": 0,
                  "corrupt_detected": 0, "corrupt_injected": 0, "nan_stops": 0, "nan_skip_runs": 0,
                  "enospc_errors": 0, "full_disk_errors": 0, "lock_refusals": 0,
                  "checkpoints_verified": 0, "silent_failures": 0, "failures": []}

    # ---------------------------------------------------------------- plumbing
    def overrides(self, out, **kw):
        base = {"data": self.data, "out": out, "max_steps": self.args.steps, "decay_steps": self.args.steps,
                "warmup_steps": 10, "model.dropout": 0.1, "save_interval": SAVE_INTERVAL,
                "log_interval": 1, "eval_interval": 10, "eval_steps": 2, "keep": 2}
        base.update(kw)
        return [f"{k}={v}" for k, v in base.items()]

    def launch(self, out=None, fault="", **kw):
        self.n_runs += 1
        env = dict(os.environ, JAXGPT_FAULT=fault, JAX_COMPILATION_CACHE_DIR=self.cache,
                   PYTHONUNBUFFERED="1",  # a killed run's stdout still says where it resumed
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", PYTHONPATH=ROOT)
        base = os.path.join(self.work, "logs", f"run{self.n_runs:03d}")
        p = subprocess.Popen([sys.executable, "-m", "jaxgpt", "train", "--config",
                              os.path.join(ROOT, "configs", "tiny.py"),
                              *self.overrides(out or self.out, **kw)],
                             env=env, cwd=self.work, stdout=open(base + ".out", "w"),
                             stderr=open(base + ".err", "w"))
        p.logs = base
        p.t0 = time.time()
        p.metrics0 = self.metrics_inode(out or self.out)
        return p

    @staticmethod
    def metrics_inode(out):
        try:
            return os.stat(os.path.join(out, "metrics.jsonl")).st_ino
        except OSError:
            return None

    def training(self, p, out=None):
        """True once run `p` has reopened metrics.jsonl (a new file) and logged a step past the
        checkpoint it resumed from: it is in the training loop."""
        out = out or self.out
        ino = self.metrics_inode(out)
        if ino is None or ino == p.metrics0:
            return False
        rows = self.rows(out)
        return bool(rows) and rows[-1].get("step", 0) > self.restored_step(p)

    def new_tmp(self, p, out=None):
        """A temporary checkpoint folder created by run `p` (stale ones from a killed run are
        older, and removed by the run's writer before it trains)."""
        for n in glob.glob(os.path.join(out or self.out, "*.orbax-checkpoint-tmp*")):
            try:
                if os.stat(n).st_mtime >= p.t0:
                    return True
            except OSError:
                pass
        return False

    @staticmethod
    def output(p):
        with open(p.logs + ".out") as f, open(p.logs + ".err") as g:
            return f.read(), g.read()

    def fail(self, what: str) -> None:
        self.c["silent_failures"] += 1
        self.c["failures"].append(what)
        log("SILENT FAILURE: " + what)

    def rows(self, out=None):
        path = os.path.join(out or self.out, "metrics.jsonl")
        got = []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        got.append(json.loads(line))
                    except ValueError:
                        pass
        return got

    def last_row(self):
        return max((r.get("step", 0) for r in self.rows()), default=0)

    def tmp_steps(self, out=None):
        names = glob.glob(os.path.join(out or self.out, "*.orbax-checkpoint-tmp*"))
        return {int(os.path.basename(n).split(".")[0]) for n in names}

    def steps(self, out=None):
        d = out or self.out
        return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []

    def wait(self, cond, p, timeout=600):
        t0 = time.time()
        while not cond():
            if p.poll() is not None or time.time() - t0 > timeout:
                return False
            time.sleep(0.005)
        return True

    def check_run_output(self, p, expect_codes, what):
        out, err = self.output(p)
        if "Traceback" in err or "Traceback" in out:
            self.fail(f"{what}: a traceback (see {p.logs}.err)")
        if p.returncode not in expect_codes:
            self.fail(f"{what}: exit status {p.returncode}, expected {expect_codes} (see {p.logs}.err)")
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        if p.returncode == 2 and len(errors) != 1:
            self.fail(f"{what}: exit 2 without exactly one `error:` line")
        return out, err

    # ---------------------------------------------------------------- checks
    def verify_newest(self, where):
        """The newest checkpoint our reader accepts must equal the reference's at that step."""
        from jaxgpt.checkpoint import load_model, model_params
        from jaxgpt.errors import UserError
        import numpy as np

        steps = self.steps()
        if not steps:
            return
        try:
            _, _, meta = load_model(self.out, steps[-1])
        except UserError as e:
            self.fail(f"{where}: the newest checkpoint {steps[-1]} cannot be loaded: {e}")
            return
        s = meta["step"]
        if s not in self.steps(self.ref):  # a SIGTERM save between the reference's saves
            return
        a = model_params(load_model(self.out, s)[0])
        b = model_params(load_model(self.ref, s)[0])
        import jax
        if any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))):
            self.fail(f"{where}: checkpoint {s} differs from the reference's")
        self.c["checkpoints_verified"] += 1

    def restored_step(self, p):
        out, _ = self.output(p)
        for line in out.splitlines():
            if line.startswith("resuming from "):
                return int(line.rsplit(" ", 1)[1])
        return 0

    # ---------------------------------------------------------------- phases
    def prepare(self):
        from jaxgpt.prepare import prepare
        prepare("stdlib", self.data, tokenizer="byte", max_files=40, quiet=True)

    def reference(self):
        t = time.time()
        p = self.launch(out=self.ref, keep=100000)
        p.wait()
        self.check_run_output(p, (0,), "reference run")
        log(f"reference: {self.args.steps} steps in {time.time() - t:.1f} s (it compiled)")

    def kill_once(self, kind):
        """Start a resume, SIGKILL (or SIGTERM) it at a point of `kind`; account for the loss."""
        newest = max(self.steps(), default=0)
        fault = "step_delay=0.04"
        if kind == "save":
            fault += ";save_delay=0.3"
        p = self.launch(fault=fault)
        sig = signal.SIGKILL
        if kind == "startup":
            time.sleep(self.rng.uniform(0.2, 9.0))
        elif kind in ("step", "sigterm"):
            self.wait(lambda: self.training(p), p)
            time.sleep(self.rng.uniform(0, 0.8))
            sig = signal.SIGTERM if kind == "sigterm" else sig
        elif kind == "save":
            self.wait(lambda: self.training(p) and self.new_tmp(p), p)
            time.sleep(self.rng.uniform(0, 0.35))
        if p.poll() is not None:
            self.check_run_output(p, (0,), f"run {p.logs} (finished before its {kind} kill)")
            return False
        # how far this run got (a run killed before it reopened metrics.jsonl got nowhere)
        at_kill = self.last_row() if self.metrics_inode(self.out) != p.metrics0 else newest
        p.send_signal(sig)
        p.wait()
        if kind == "sigterm":
            out, err = self.check_run_output(p, (75,), "SIGTERM")
            stopped = int(out.split("interrupted at step ")[1].split(";")[0]) if "interrupted at step" in out else -1
            if max(self.steps(), default=0) != stopped:
                self.fail(f"SIGTERM: stopped at {stopped} but the newest checkpoint is {self.steps()}")
            self.c["sigterms"] += 1
        else:
            self.c["kills"] += 1
            self.c[f"kills_{'at_startup' if kind == 'startup' else 'in_' + kind}"] += 1
        restored = self.restored_step(p)
        self.c["resumes"] += 1 if restored else 0
        newest_after = max(self.steps(), default=0)
        self.c["steps_lost"].append(max(0, at_kill - newest_after))
        self.verify_newest(f"after the {kind} kill of {p.logs}")
        log(f"{kind:8s} kill: resumed from {restored}, progress to row {at_kill}, "
            f"newest checkpoint {newest_after}, tmp {sorted(self.tmp_steps())}")
        return True

    def inject_truncation(self):
        steps = self.steps()
        if not steps:
            return
        s = steps[-1]
        files = glob.glob(os.path.join(self.out, str(s), "params", "**", "d", "*"), recursive=True)
        with open(max(files, key=os.path.getsize), "r+b") as f:
            f.truncate(100)
        manifest = os.path.join(self.out, str(s), "jaxgpt_manifest.json")
        if self.rng.random() < 0.5 and os.path.exists(manifest):
            os.remove(manifest)  # without its manifest, only the restore attempt can tell
        self.c["corrupt_injected"] += 1
        p = self.launch(fault="step_delay=0.04")
        ok = self.wait(lambda: os.path.isdir(os.path.join(self.out, f"{s}.damaged")), p, timeout=300)
        self.wait(lambda: self.training(p), p)
        p.kill()
        p.wait()
        _, err = self.output(p)
        if ok and f"checkpoint step {s} in" in err and "moved it to" in err:
            self.c["corrupt_detected"] += 1
            log(f"truncated checkpoint {s}: reported, moved aside, resumed from {self.restored_step(p)}")
        else:
            self.fail(f"a truncated checkpoint {s} was not reported at resume ({p.logs}.err)")
        if self.restored_step(p) >= s:
            self.fail(f"resumed from the truncated checkpoint {s}")
        self.c["kills"] += 1
        self.c["kills_in_step"] += 1
        self.verify_newest("after the truncation")

    def inject_nan(self):
        at = self.last_row() + 3
        p = self.launch(fault=f"nan_at={at}")
        p.wait()
        _, err = self.check_run_output(p, (3,), "NaN stop")
        if f"at step {at} (nan_policy=stop)" not in err:
            self.fail(f"the NaN at step {at} was not named: {err.splitlines()[-1:]}")
        if max(self.steps(), default=0) >= at:
            self.fail(f"a checkpoint at or after the NaN step {at}: {self.steps()}")
        self.c["nan_stops"] += 1
        log(f"NaN at step {at}: stopped with exit 3, newest checkpoint {max(self.steps(), default=0)}")
        # nan_policy=skip on a scratch copy (its trajectory leaves the reference's on purpose)
        scratch = os.path.join(self.work, "skip")
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(self.out, scratch)
        at = max(self.steps(), default=0) + 2
        p = self.launch(out=scratch, fault=f"nan_at={at},{at + 1}",
                        max_steps=at + 6, nan_policy="skip", nan_max_skips=3)
        p.wait()
        self.check_run_output(p, (0,), "nan_policy=skip")
        marked = sorted(r["step"] for r in self.rows(scratch) if r.get("skipped"))
        if marked != [at, at + 1]:
            self.fail(f"nan_policy=skip marked steps {marked}, expected {[at, at + 1]}")
        self.c["nan_skip_runs"] += 1

    def inject_enospc(self):
        newest = max(self.steps(), default=0)
        at = (self.last_row() // SAVE_INTERVAL + 2) * SAVE_INTERVAL
        p = self.launch(fault=f"enospc_at={at}")
        p.wait()
        _, err = self.check_run_output(p, (2,), "ENOSPC")
        if "the disk is full" not in err:
            self.fail(f"ENOSPC at step {at} not reported as a full disk")
        if self.tmp_steps() or not self.steps() or max(self.steps()) >= at:
            self.fail(f"after ENOSPC: steps {self.steps()}, tmp {self.tmp_steps()}")
        self.c["enospc_errors"] += 1
        self.verify_newest("after ENOSPC")
        log(f"ENOSPC at step {at}: one-line error, newest checkpoint {max(self.steps())} (was {newest})")

    def inject_full_tmpfs(self):
        """A real full disk: the run folder copied into a tmpfs with ~one checkpoint to spare."""
        mnt = os.path.join(self.work, "tmpfs")
        os.makedirs(mnt, exist_ok=True)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", mnt],
                          capture_output=True).returncode:
            log("no tmpfs (mount refused): the real full-disk check is skipped")
            return
        try:
            out = os.path.join(mnt, "run")
            shutil.copytree(self.out, out)
            before = self.steps(out)
            st = os.statvfs(mnt)  # fill it up, leaving less than one checkpoint free
            size = st.f_bavail * st.f_frsize - 96 * 1024
            with open(os.path.join(mnt, "filler"), "wb") as f:
                f.write(b"\0" * size)
            p = self.launch(out=out, max_steps=self.args.steps)
            p.wait()
            _, err = self.check_run_output(p, (2,), "full tmpfs")
            last = (err.strip().splitlines() or [""])[-1]
            if "disk is full" not in last and "No space left" not in last:
                self.fail(f"full tmpfs: {last}")
            from jaxgpt.checkpoint import load_model
            for s in before:
                if s in self.steps(out):
                    load_model(out, s)  # still intact
            if [s for s in self.tmp_steps(out)]:
                self.fail(f"full tmpfs left a temporary folder {self.tmp_steps(out)}")
            self.c["full_disk_errors"] += 1
            log(f"real full disk (tmpfs of {size} bytes): {last[:140]}")
        finally:
            subprocess.run(["umount", mnt], capture_output=True)

    def inject_second_run(self):
        a = self.launch(fault="step_delay=0.04")
        self.wait(lambda: self.training(a), a)
        b = self.launch()
        b.wait()
        _, err = self.check_run_output(b, (2,), "second run")
        if f"pid {a.pid} on" not in err:
            self.fail(f"the second run did not name the first: {err.splitlines()[-1:]}")
        if a.poll() is not None:
            self.fail("the first run died when a second one started")
        self.c["lock_refusals"] += 1
        at_kill = self.last_row()  # `a` reopened metrics.jsonl: its rows
        a.kill()
        a.wait()
        self.c["kills"] += 1
        self.c["kills_in_step"] += 1
        self.c["steps_lost"].append(max(0, at_kill - max(self.steps(), default=0)))
        log(f"second run refused (pid {a.pid} named); first killed at row {at_kill}")

    def finish(self):
        p = self.launch()
        p.wait()
        self.check_run_output(p, (0,), "final run")
        if self.restored_step(p):
            self.c["resumes"] += 1
        ref = {r["step"]: r for r in self.rows(self.ref)}
        got: dict = {}
        for r in self.rows():
            if r["step"] in got:
                self.c["mismatches"] += 1  # a duplicate row
            got[r["step"]] = r
        for s in sorted(set(ref) | set(got)):
            a, b = ref.get(s), got.get(s)
            if a is None or b is None or any(a.get(k) != b.get(k) for k in KEYS):
                self.c["mismatches"] += 1
        from jaxgpt.checkpoint import load_model, model_params
        import jax
        import numpy as np
        n = self.args.steps
        a = model_params(load_model(self.out, n)[0])
        b = model_params(load_model(self.ref, n)[0])
        if any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))):
            self.c["mismatches"] += 1
            log("final params differ")

    def run(self):
        t0 = time.time()
        self.prepare()
        self.reference()
        kinds = ["startup"] * 3 + ["save"] * 12 + ["step"] * (self.args.kills - 15)
        self.rng.shuffle(kinds)
        extra = {len(kinds) // 6: self.inject_second_run, len(kinds) // 3: self.inject_truncation,
                 len(kinds) // 2: self.inject_nan, 2 * len(kinds) // 3: self.inject_enospc,
                 3 * len(kinds) // 4: self.inject_truncation, 5 * len(kinds) // 6: self.inject_full_tmpfs}
        sigterms = set(self.rng.sample(range(len(kinds)), 3))
        for i, kind in enumerate(kinds):
            if i in extra:
                extra[i]()
            if i in sigterms:
                self.kill_once("sigterm")
            self.kill_once(kind)
        self.finish()
        lost = self.c.pop("steps_lost")
        c = self.c
        result = {"kills": c["kills"], "kills_at_startup": c["kills_at_startup"],
                  "kills_in_step": c["kills_in_step"], "kills_in_save": c["kills_in_save"],
                  "sigterms": c["sigterms"], "resumes": c["resumes"],
                  "steps_lost_max": max(lost, default=0),
                  "steps_lost_mean": round(sum(lost) / max(len(lost), 1), 2),
                  "mismatches": c["mismatches"], "corrupt_detected": c["corrupt_detected"],
                  "corrupt_injected": c["corrupt_injected"], "nan_stops": c["nan_stops"],
                  "nan_skip_runs": c["nan_skip_runs"], "enospc_errors": c["enospc_errors"],
                  "full_disk_errors": c["full_disk_errors"], "lock_refusals": c["lock_refusals"],
                  "checkpoints_verified": c["checkpoints_verified"],
                  "silent_failures": c["silent_failures"], "steps": self.args.steps,
                  "runs": self.n_runs, "seconds": round(time.time() - t0, 1)}
        if c["failures"]:
            result["failures"] = c["failures"]
        print(json.dumps(result), flush=True)
        if not self.args.keep_workdir and not c["silent_failures"] and not c["mismatches"]:
            shutil.rmtree(self.work, ignore_errors=True)
        return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=30, help="SIGKILLs (>= 16), besides the injections")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=200, help="training steps of the run")
    ap.add_argument("--workdir", default=None, help="default: a fresh temporary folder")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the runs' folders and logs")
    args = ap.parse_args()
    if args.kills < 16:
        ap.error("--kills must be >= 16")
    r = Harness(args).run()
    return 1 if r["silent_failures"] or r["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
