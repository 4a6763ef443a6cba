"""What a training run does about faults: the run lock, SIGTERM/Ctrl-C, NaN/Inf, test fault points.

The training loop uses one `RunGuard` per run (`with RunGuard(cfg) as guard:`) and calls it from
a few marked places (see `jaxgpt/train/loop.py`, the lines tagged `FAULTS`):

- **Lock.** `out/.lock` is locked with `fcntl.flock` before anything is written to `out`, so a
  second `train` on the same folder fails at once, naming the first one's PID and host. The OS
  drops the lock when the process dies (even by SIGKILL), so a killed run never leaves it stuck;
  a stale file is simply locked again. Multi-host: only process 0 takes it.
- **Signals.** The first SIGTERM or Ctrl-C (SIGINT) only sets a flag. The loop looks at it once
  per step, leaves at a step boundary (never inside an Orbax save or an eval), saves, and raises
  `Interrupted`, whose `exit_code` `jaxgpt train` returns: 75 after SIGTERM (EX_TEMPFAIL:
  "saved, start me again"), 130 after Ctrl-C. A second signal aborts at once, without a save,
  and so does a first one before any step has finished (start-up, restore, the first compile:
  there is nothing new to save, and waiting for a compile could outlast a preemption's grace).
- **NaN/Inf.** The train step already refuses a non-finite update (params and optimizer state
  unchanged, `metrics["finite"]` False). `observe` reads that flag one step late, right after
  the loop's existing wait for the previous step (so no extra device sync), and at once before
  an eval or a save (which wait for the step anyway). nan_policy=stop raises `NonFiniteStop`
  and the loop saves nothing more; nan_policy=skip marks the step's metrics row
  (`"skipped": true`) and stops after `nan_max_skips` consecutive skips.
- **Fault points (tests only).** `JAXGPT_FAULT`, `;`-separated `key=value` items, read once per
  run; unset, each costs one attribute test:
    nan_at=5,9-11   the batches of these steps (numbered as in metrics.jsonl, 1-based) get NaN
                    in their float inputs (mask/weight), so their loss is NaN
    save_delay=1.5  each checkpoint write sleeps this long in the background writer after its
                    items are written and before Orbax commits (renames) the step folder;
                    save_delay=1.5@20 only for the saves of steps >= 20
    enospc_at=10    the checkpoint writes of steps >= 10 fail with OSError(ENOSPC) there
    kill_after_save=6  SIGKILL the process as soon as checkpoint 6 has committed (from the
                    main thread, right after the save call: the worst moment for metrics.jsonl)
    step_delay=0.05 each step sleeps this long on the host (a slow run, for kill timing)
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import signal
import socket
import threading
import time

import numpy as np

from jaxgpt.errors import UserError

LOCK_NAME = ".lock"
EXIT_NONFINITE = 3  # nan_policy stopped the run; the last good checkpoint is the latest
EXIT_SIGTERM = 75  # stopped by SIGTERM after saving (EX_TEMPFAIL: start again to continue)
EXIT_SIGINT = 130  # stopped by Ctrl-C after saving


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal. `saved`: a checkpoint of the last step was written."""

    def __init__(self, signum: int, step: int | None, saved: bool):
        super().__init__(signal.Signals(signum).name + ("" if step is None else f" at step {step}"))
        self.signum, self.step, self.saved = signum, step, saved
        self.exit_code = EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_SIGINT


class NonFiniteStop(UserError):
    """nan_policy stopped the run; nothing was saved from the step that tripped it on."""
    exit_code = EXIT_NONFINITE


# ----------------------------------------------------------------------------- fault points

@dataclasses.dataclass(frozen=True)
class Injected:
    nan_at: frozenset = frozenset()
    save_delay: float = 0.0
    save_delay_from: int = 0
    enospc_at: int | None = None
    kill_after_save: int | None = None
    step_delay: float = 0.0

    @property
    def writer(self) -> bool:
        """Whether the checkpoint writer's commit needs the fault hook."""
        return self.save_delay > 0 or self.enospc_at is not None


def injected(spec: str | None = None) -> Injected:
    """The test-only fault points of `JAXGPT_FAULT` (or `spec`); a bad spec is a UserError."""
    spec = os.environ.get("JAXGPT_FAULT", "") if spec is None else spec
    if not spec.strip():
        return Injected()
    kw: dict = {}
    try:
        for item in filter(None, (s.strip() for s in spec.split(";"))):
            key, _, value = item.partition("=")
            key = key.strip()
            if key == "nan_at":
                steps = set()
                for part in value.split(","):
                    lo, _, hi = part.partition("-")
                    steps.update(range(int(lo), int(hi or lo) + 1))
                kw[key] = frozenset(steps)
            elif key == "save_delay":
                delay, _, start = value.partition("@")
                kw[key], kw["save_delay_from"] = float(delay), int(start or 0)
            elif key == "step_delay":
                kw[key] = float(value)
            elif key in ("enospc_at", "kill_after_save"):
                kw[key] = int(value)
            else:
                raise ValueError(key)
    except ValueError:
        raise UserError(f"JAXGPT_FAULT={spec!r}: expected items like nan_at=5,7-9; save_delay=1.5@20; "
                        "enospc_at=10; kill_after_save=6; step_delay=0.05 (a test-only setting)") from None
    return Injected(**kw)


def writer_fault(spec: Injected, final_dir: str) -> None:
    """Called by the checkpoint writer's background thread once every item of a step is written
    and before Orbax commits it (only when a writer fault is set)."""
    name = os.path.basename(os.path.normpath(final_dir))
    step = int(name) if name.isdigit() else -1
    if spec.save_delay > 0 and step >= spec.save_delay_from:
        time.sleep(spec.save_delay)
    if spec.enospc_at is not None and name.isdigit() and int(name) >= spec.enospc_at:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected by JAXGPT_FAULT)", final_dir)


def poison(batch: dict) -> dict:
    """The batch with every float input (the loss mask / weights) set to NaN."""
    return {k: np.full_like(v, np.nan) if np.issubdtype(v.dtype, np.floating) else v
            for k, v in batch.items()}


# ----------------------------------------------------------------------------- run lock

class RunLock:
    """An exclusive `flock` on `out_dir/.lock`, holding "pid N on HOST since TIME".

    The lock is the flock, not the file: the OS drops it when the process dies, so a file left
    by a killed run is locked again by the next one. `release` removes the file (and the folder,
    if `acquire` created it and nothing else was written there)."""

    def __init__(self, out_dir: str):
        self.out_dir = os.path.abspath(out_dir)
        self.path = os.path.join(self.out_dir, LOCK_NAME)
        self.fd: int | None = None
        self.created_dir = False

    def acquire(self) -> "RunLock":
        out = self.out_dir
        if os.path.exists(out) and not os.path.isdir(out):
            raise UserError(f"out={out} exists and is not a folder")
        try:
            if not os.path.isdir(out):
                os.makedirs(out)
                self.created_dir = True
        except OSError as e:
            raise UserError(f"cannot create the out folder {out}: {e.strerror or e}") from None
        if not os.access(out, os.W_OK | os.X_OK):
            raise UserError(f"the out folder {out} is not writable")
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                self._drop_dir()
                raise UserError(f"cannot write to the out folder {out}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise UserError(f"{out} is in use by another `jaxgpt train` ({holder}); wait for "
                                    "it to finish or stop it, or use another out= folder") from None
                raise UserError(f"cannot lock {self.path}: {e.strerror or e}") from None
            # Its previous holder may have removed the file between our open and our flock:
            # then we hold a lock on a file nobody else will open. Start again on the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        except OSError as e:
            self.release()
            raise UserError(f"cannot write to the out folder {out}: {e.strerror or e}") from None
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: see acquire's inode check
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        self._drop_dir()

    def _drop_dir(self) -> None:
        if self.created_dir:  # a run that failed before writing anything leaves no folder
            try:
                os.rmdir(self.out_dir)
            except OSError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"


# ----------------------------------------------------------------------------- the run guard

class RunGuard:
    """Lock, signal handlers, NaN policy and fault points of one training run (see module doc)."""

    def __init__(self, cfg, primary: bool = True):
        self.cfg = cfg
        self.inject = injected()
        self.lock = RunLock(cfg.out) if primary else None
        self.signal: int | None = None  # the first SIGTERM/SIGINT received
        self.aborted = False  # a second signal: stop now, save nothing
        self.nonfinite: str | None = None  # why nan_policy stopped the run
        self.skipped = self.consecutive = 0
        self._seen = 0  # last step whose `finite` flag was read
        self._stepped = False  # a step has finished in this process
        self._old_handlers: dict = {}

    def __enter__(self) -> "RunGuard":
        if self.lock is not None:
            self.lock.acquire()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        self._restore_handlers()
        if self.lock is not None:
            self.lock.release()

    def _restore_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers = {}

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is None and self._stepped:
            self.signal = signum
            # os.write: print() from a handler can collide with the main thread's own output
            os.write(2, f"\n{name}: stopping after this step and saving a checkpoint "
                        f"(send it again to stop at once, without saving)\n".encode())
            return
        self.signal = self.signal or signum
        self.aborted = True
        self._restore_handlers()
        if not self._stepped:
            os.write(2, f"\n{name} before the first step finished: stopping, nothing to save\n".encode())
        raise Interrupted(signum, None, saved=False)

    # -- once per step
    @property
    def stop_requested(self) -> bool:
        return self.signal is not None

    @property
    def may_save(self) -> bool:
        """False once nan_policy stopped the run or a second signal aborted it."""
        return self.nonfinite is None and not self.aborted

    def batch(self, step: int, batch: dict) -> dict:
        """The batch of step index `step` (0-based), poisoned if JAXGPT_FAULT says so."""
        if self.inject.step_delay:
            time.sleep(self.inject.step_delay)
        if self.inject.nan_at and step + 1 in self.inject.nan_at:
            return poison(batch)
        return batch

    def observe(self, step: int, metrics: dict, logger) -> None:
        """Act on step `step`'s `finite` flag (1-based, as logged), once per step."""
        self._stepped = True
        if step <= self._seen:
            return
        self._seen = step
        if bool(_first(metrics["finite"])):  # a ready scalar: one tiny copy, no sync
            self.consecutive = 0
            return
        m = {k: float(_first(metrics[k])) for k in ("loss", "grad_norm")}
        what = f"loss {m['loss']}, gradient norm {m['grad_norm']}"
        cfg = self.cfg
        if cfg.nan_policy == "stop":
            self.nonfinite = (f"non-finite {what} at step {step} (nan_policy=stop): training stopped "
                              "and nothing from this step on was saved; the latest checkpoint is the "
                              "last good one. Lower lr, set grad_clip, or try nan_policy=skip")
            raise NonFiniteStop(self.nonfinite)
        self.skipped += 1
        self.consecutive += 1
        logged = (step % cfg.log_interval == 0 or step % cfg.eval_interval == 0
                  or step == cfg.max_steps)
        logger.mark_skipped(step, train_loss=m["loss"], grad_norm=m["grad_norm"],
                            skipped_total=self.skipped, own_row=not logged)
        if self.consecutive >= cfg.nan_max_skips:
            self.nonfinite = (f"non-finite {what} at step {step}: {self.consecutive} consecutive steps "
                              f"skipped (nan_policy=skip, nan_max_skips={cfg.nan_max_skips}); training "
                              "stopped without a final save")
            raise NonFiniteStop(self.nonfinite)

    def interrupted(self, step: int) -> Interrupted:
        return Interrupted(self.signal or signal.SIGINT, step, saved=self.may_save)


def _first(x):
    """The value of a per-device (pmap) or global metric: device 0's copy (all hold the same,
    psum'ed value), read without gathering the others."""
    if hasattr(x, "addressable_data"):
        x = x.addressable_data(0)
    return np.asarray(x).reshape(-1)[0]
