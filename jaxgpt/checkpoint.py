"""Orbax checkpoints that carry everything `eval` and `generate` need, and survive crashes.

Layout of a run folder (`out/`):
    out/<step>/params     model parameters (float32), an Orbax PyTree item
    out/<step>/train      optimizer state, step and RNG key: only `resume` reads it
    out/<step>/meta       JSON: format tag, resolved config, tokenizer, data meta, metrics, version
    out/<step>/jaxgpt_manifest.json   size and CRC-32 of every file of the three items
    out/metrics.jsonl, out/loss.png, out/.lock  (written by the training loop, ignored here)

Params and training state are separate items so `eval`/`generate` restore the params alone,
through an abstract target built from the stored config (`nnx.eval_shape`), never guessing a
structure and never allocating twice.

Any layout, any device count: the writer hands Orbax the run's global jax.Arrays as they are
(sharded under parallel=mesh, one replicated view under pmap); every process of a multi-host
run saves collectively, each writing the shards it holds, and process 0 commits. A restore
target carries the shardings of the layout that reads (`restore_target` of a strategy in
jaxgpt/train/parallel.py, or `load_model(mesh=...)`), so each shard is read straight onto its
device; without one, the params land whole on the first device. A checkpoint written under
8-way FSDP thus resumes on one device, on four, under pmap or tensor parallelism.

Crash safety:
- Orbax writes all three items of a step into `<step>.orbax-checkpoint-tmp*` and renames that
  folder to `<step>` only once every item is written, so a step folder is complete or absent.
  Only all-digit folder names are steps: a temporary folder left by a kill is never read, and
  the next `train` in that folder removes it (Orbax's cleanup_tmp_directories; the run lock
  guarantees no other writer is using it).
- Once every item of a step is written, and before the rename, the writer records the
  manifest in the temporary folder (in Orbax's background thread), so a committed step has one.
  Retention (the newest `keep` plus the best by val metric) runs only once the save has
  committed, so it counts only committed checkpoints and never removes the last good one while
  a newer save is still in flight (or fails).
  A step is removed by renaming it to `.deleting-<step>-*` and then deleting that, so a kill
  mid-deletion never leaves a half-deleted step folder (the next writer finishes the job).
- Reading checks a step before trusting it: the meta item parses and carries our format tag,
  the items it needs exist, and the manifest's sizes match (and, for the items being restored,
  the CRCs: a flipped bit inside an array file otherwise restores silently). The restore itself
  is the final check. `Resume` (train) and `load_model` without a step (eval, generate,
  convert) fall back to the next intact checkpoint with a one-line warning naming the one
  skipped; with an explicit step, a damaged checkpoint is a one-line error. A resumed run moves
  each damaged step folder aside to `<step>.damaged` (it would otherwise collide with the step
  it saves next) and says so; nothing is ever deleted but by retention.
- A failed save (a full disk, say) stops training with one line; the tmp folder of the failed
  save is removed, the earlier checkpoints are untouched.

Loading without `step` takes the best checkpoint by the validation metric (val loss, or val
accuracy for classification) — for a plain pretraining run the best is almost always the
latest — and `resume` takes the latest.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import uuid
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxgpt.config import Config
from jaxgpt.errors import UserError

FORMAT = "jaxgpt-ckpt-1"
_FORMAT_PREFIX = "jaxgpt-ckpt-"
_ITEMS = ("params", "train", "meta")
MANIFEST = "jaxgpt_manifest.json"
_TMP_MARK = ".orbax-checkpoint-tmp"
_DELETING = ".deleting-"


def _version() -> str:
    from jaxgpt import __version__
    return __version__


def _savable(tree):
    """What Orbax is handed: jax.Arrays as they are, global and possibly sharded (each process
    writes the shards it holds, collectively, and no process copies a whole sharded model to
    its host), anything else as numpy."""
    return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else np.asarray(x), tree)


def _abstract(tree, keep_sharding: bool = False):
    """Restore targets. With keep_sharding, a leaf's own sharding (a ShapeDtypeStruct's, as a
    strategy's `restore_target` gives them, or an array's) is kept: Orbax reads each shard
    straight onto its device, whatever layout wrote the checkpoint. Otherwise, and for a leaf
    without one, the first local device: never the layout it was written from, whose devices
    may not exist here (an 8-device run's checkpoint read on one device)."""
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(x):
        sharding = getattr(x, "sharding", None) if keep_sharding else None
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding or one)
    return jax.tree.map(leaf, tree)


def sharded_target(abstract_tree, shardings):
    """ShapeDtypeStructs of `abstract_tree` carrying `shardings`: a restore target."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s),
                        abstract_tree, shardings)


def model_params(model) -> dict:
    """The model's parameters as a plain nested dict of arrays (what the `params` item holds)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def metric_of(meta: dict) -> tuple[str, float] | None:
    """(name, value to minimise) of a checkpoint's selection metric, if it was evaluated to a
    finite value (a NaN val loss is never the best)."""
    m = meta.get("metrics") or {}
    try:
        if meta.get("config", {}).get("task") == "classify" and m.get("val_acc") is not None:
            name, value = "val_acc", -float(m["val_acc"])
        elif m.get("val_loss") is not None:
            name, value = "val_loss", float(m["val_loss"])
        else:
            return None
    except (TypeError, ValueError):
        return None
    return (name, value) if math.isfinite(value) else None


class _OrbaxNoise(logging.Filter):
    """Orbax logs through absl: a failed background save logs ERRORs with tracebacks, which the
    writer reports itself as one line. Drop exactly those (Orbax's ERROR records) and its advice
    on waiting saves; its other warnings still show. (The read-only warnings every command used
    to print came from opening a read-only CheckpointManager to read; readers no longer open
    one.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        if logging.ERROR <= record.levelno < logging.CRITICAL:
            return False
        # Its advice to checkpoint less often when a save waits for the previous one: the
        # writer waits for each save itself (one in flight at a time), so this is expected.
        return not record.getMessage().startswith("Waiting for previous save to complete")


def _quiet_orbax() -> None:
    log = logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxNoise) for f in log.filters):
        log.addFilter(_OrbaxNoise())
    _skip_io_metrics()


def _skip_io_metrics() -> None:
    """Every array save (and restore) of Orbax 0.12 asks TensorStore for its I/O byte counters
    (`get_tensorstore_raw_bytes`), twice, only for an INFO log line of throughput. TensorStore
    (0.1.80-0.1.86 measured) leaks the Python objects it builds for such JSON answers, about
    3 MB per 100 saves of a small model: most of a long run's memory growth (scripts/soak.py).
    Orbax treats None as "no counters" and skips that line; only this answer changes."""
    try:
        from orbax.checkpoint._src.serialization import tensorstore_utils as tsu
    except ImportError:  # another Orbax layout: leave it alone
        return
    fn = getattr(tsu, "get_tensorstore_raw_bytes", None)
    if fn is None or getattr(fn, "jaxgpt_skip", False) or not ocp.__version__.startswith("0.12."):
        return

    def no_counters(direction=None):
        return None

    no_counters.jaxgpt_skip = True
    tsu.get_tensorstore_raw_bytes = no_counters


# ----------------------------------------------------------------------------- writing

class CheckpointWriter:
    """Saves (asynchronously) into a run folder, with a manifest in each commit, and applies the
    newest-`keep` + best retention once each save has committed (see the module docstring)."""

    def __init__(self, directory: str, keep: int, blocking: bool = True):
        """blocking: each save returns once its step has committed (Orbax still writes in its
        background thread, but training does not run ahead), so a kill loses at most the steps
        since the last save. With blocking=False training goes on during the write, and a kill
        mid-write also loses the steps run meanwhile (up to 2 x save_interval)."""
        _quiet_orbax()
        _drop_closed_loop_noise()  # a failed write leaves the same stray callbacks as a failed read
        self.directory = os.path.abspath(directory)
        self.keep = keep
        self.blocking = blocking
        # Multi-process: every process saves (Orbax writes each one's shards, process 0 commits);
        # only process 0 touches the folder otherwise (manifest fallback, retention, clean-up).
        self.primary = jax.process_index() == 0
        self.failed: UserError | None = None
        self._pending: int | None = None  # the step whose save is in flight
        self._kill_after: int | None = None
        self._failed_step: int | None = None
        spec = None
        if os.environ.get("JAXGPT_FAULT"):  # test-only fault points (jaxgpt/train/faults.py)
            from jaxgpt.train.faults import injected
            spec = injected()
            self._kill_after = spec.kill_after_save
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, enable_async_checkpointing=True,
            cleanup_tmp_directories=True, temporary_path_class=_manifest_then_commit(spec))
        try:
            self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
        except OSError as e:
            raise UserError(f"cannot write checkpoints to {self.directory}: {e.strerror or e}") from None
        for name in os.listdir(self.directory) if self.primary else ():  # deletions a kill interrupted
            if name.startswith(_DELETING):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, params, train_state, meta: dict) -> None:
        if self.failed is not None:
            return
        self._settle()  # one save in flight at a time
        if step in self._mngr.all_steps():  # e.g. Ctrl-C right after a periodic save
            return
        meta = dict(meta, format=FORMAT, step=int(step), jaxgpt_version=_version())
        args = ocp.args.Composite(params=ocp.args.StandardSave(_savable(params)),
                                  train=ocp.args.StandardSave(_savable(train_state)),
                                  meta=ocp.args.JsonSave(meta))
        self._pending = step
        try:
            self._mngr.save(step, args=args)
        except Exception as e:  # the synchronous part of the save (e.g. creating its folder)
            self._fail(e)
        if step == self._kill_after:  # test-only: a SIGKILL right after this step has committed
            self._mngr.wait_until_finished()
            os.kill(os.getpid(), signal.SIGKILL)
        if self.blocking:
            self._settle()

    def _settle(self) -> None:
        """Wait for the save in flight; once it has committed, record its manifest and apply
        retention. A failed save raises a one-line UserError (once)."""
        if self._pending is None:
            return
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            self._fail(e)
        step_dir = os.path.join(self.directory, str(self._pending))
        if not self.primary:  # the step is committed (Orbax's barrier); process 0 does the rest
            self._pending = None
            return
        if not os.path.isdir(step_dir):
            self._fail(RuntimeError("Orbax did not commit it"))
        if not os.path.exists(os.path.join(step_dir, MANIFEST)):  # (written before the commit)
            try:
                write_manifest(step_dir)
            except OSError as e:
                self._fail(e, committed=True)
        self._pending = None
        self._retain()

    def _fail(self, e: BaseException, committed: bool = False):
        step = self._pending
        try:  # let whatever Orbax still has in flight end before its folder is removed
            self._mngr.wait_until_finished()
        except Exception:
            pass
        self._remove_tmp(step)
        self._failed_step = step
        # The failed write's other tensorstore writes fail too; asyncio logs each one, with its
        # traceback, when its future is collected ("exception was never retrieved"). The run
        # reports the failure in one line below, and it is ending: drop those records.
        logging.getLogger("asyncio").addFilter(_drop_unretrieved)
        older = [s for s in _step_numbers(self.directory) if s != step or committed]
        kept = (f"the latest checkpoint is step {max(older)}, intact" if older
                else "there is no earlier checkpoint")
        why = "the disk is full" if _is_enospc(e) else f"{type(e).__name__}: {_first_line(e)}"
        what = "the manifest of checkpoint step" if committed else "checkpoint step"
        self.failed = UserError(f"could not write {what} {step} in {self.directory}: {why}; "
                                f"training stopped ({kept})")
        self._pending = None
        raise self.failed

    def _retain(self) -> None:
        steps = sorted(self._mngr.all_steps())  # committed steps only
        keep = set(steps[-self.keep:])
        scored = []
        for s in steps:
            try:
                score = metric_of(_read_meta_file(self.directory, s))
            except _Bad:
                score = None
            if score is not None:
                scored.append((score[1], s))
        if scored:
            keep.add(min(scored)[1])
        doomed = [s for s in steps if s not in keep]
        for s in doomed:
            try:
                _delete_step(self.directory, s)
            except OSError as e:  # retention is housekeeping: never worth stopping a run for
                _warn(f"could not remove old checkpoint step {s} in {self.directory}: {e.strerror or e}")
        if doomed:
            self._mngr.reload()

    def _remove_tmp(self, step, settle: float = 0.0) -> None:
        """Remove our own failed save's temporary folder. settle: keep removing it for this
        long: after a failed write (a full disk), a write of Orbax's that is not joined (the
        item's `_sharding` file) can re-create the folder after it was removed."""
        if not self.primary:
            return
        deadline = time.monotonic() + settle
        while True:
            for name in os.listdir(self.directory):
                if name.startswith(f"{step}{_TMP_MARK}"):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            if time.monotonic() >= deadline:
                return
            time.sleep(0.1)

    def wait(self) -> None:
        self._settle()

    def close(self) -> None:
        try:
            if self.failed is None:
                self._settle()
        finally:
            try:
                self._mngr.close()
            except Exception:
                if self.failed is None:
                    raise
            if self._failed_step is not None:  # writes of the failed save that were still in
                self._remove_tmp(self._failed_step, settle=1.0)  # flight may re-create its folder


def _manifest_then_commit(spec=None):
    """Orbax's atomic-rename temporary path (its default for local folders), whose commit first
    writes our manifest into the step's temporary folder: it runs in Orbax's background thread
    once every item is written, before the rename, so a committed step always has its manifest.
    `spec`: the test-only writer faults (a delay, ENOSPC) that run there too."""

    class ManifestThenCommit(ocp.path.atomicity.AtomicRenameTemporaryPath):
        async def finalize(self, *args, **kwargs):
            if os.path.basename(str(self.get_final())).isdigit():  # a step (items commit too)
                if spec is not None and spec.writer:
                    from jaxgpt.train.faults import writer_fault
                    writer_fault(spec, str(self.get_final()))
                write_manifest(str(self.get()))
            return await super().finalize(*args, **kwargs)

    return ManifestThenCommit


def _delete_step(directory: str, step: int) -> None:
    gone = os.path.join(directory, f"{_DELETING}{step}-{uuid.uuid4().hex[:8]}")
    os.rename(os.path.join(directory, str(step)), gone)  # atomic: the step is gone or whole
    shutil.rmtree(gone, ignore_errors=True)


def _file_crc(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _item_files(step_dir: str, items=_ITEMS) -> list[str]:
    out = []
    for item in items:
        for root, _, files in os.walk(os.path.join(step_dir, item)):
            out += [os.path.relpath(os.path.join(root, f), step_dir) for f in files]
    return sorted(out)


def write_manifest(step_dir: str) -> None:
    """Record the size and CRC-32 of every file of a committed step's items (atomically)."""
    files = {rel: [os.path.getsize(p := os.path.join(step_dir, rel)), _file_crc(p)]
             for rel in _item_files(step_dir)}
    tmp = os.path.join(step_dir, f".{MANIFEST}.tmp")
    with open(tmp, "w") as f:
        json.dump({"format": "jaxgpt-manifest-1", "files": files}, f)
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


# ----------------------------------------------------------------------------- checking

class _Bad(Exception):
    """A step folder that cannot be used. kind: damaged | foreign | future."""

    def __init__(self, kind: str, why: str):
        super().__init__(why)
        self.kind, self.why = kind, why


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else "")[:200]


def _is_enospc(e: BaseException | None) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _step_numbers(ckpt_dir: str) -> list[int]:
    try:
        names = os.listdir(ckpt_dir)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n)))


def has_steps(ckpt_dir: str) -> bool:
    """Whether `ckpt_dir` holds any step folder (intact or not)."""
    return bool(_step_numbers(ckpt_dir))


def _read_meta_file(ckpt_dir: str, step: int) -> dict:
    step_dir = os.path.join(ckpt_dir, str(step))
    path = os.path.join(step_dir, "meta", "metadata")
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        present = [i for i in _ITEMS if os.path.isdir(os.path.join(step_dir, i))]
        try:
            others = os.listdir(step_dir)
        except OSError:
            others = []
        if not present and others:
            raise _Bad("foreign", "it holds none of the items params, train, meta") from None
        raise _Bad("damaged", "its meta item is missing") from None
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise _Bad("damaged", f"its metadata is unreadable ({type(e).__name__}: {_first_line(e)[:80]})") from None
    if not isinstance(meta, dict):
        raise _Bad("damaged", "its metadata is not a JSON object")
    fmt = meta.get("format")
    if fmt != FORMAT:
        if isinstance(fmt, str) and fmt.startswith(_FORMAT_PREFIX):
            raise _Bad("future", f"it was written by jaxgpt {meta.get('jaxgpt_version', '?')} in format "
                                 f"{fmt}, which jaxgpt {_version()} cannot read; upgrade jaxgpt")
        raise _Bad("foreign", f"its metadata is not a jaxgpt checkpoint's (format {fmt!r})")
    return meta


def _check(ckpt_dir: str, step: int, items: tuple, deep: bool) -> dict:
    """The step's meta if the step looks usable for `items`; else raise _Bad."""
    meta = _read_meta_file(ckpt_dir, step)
    step_dir = os.path.join(ckpt_dir, str(step))
    for item in items:
        if not os.path.isdir(os.path.join(step_dir, item)):
            raise _Bad("damaged", f"its {item} item is missing")
    mpath = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(mpath):  # killed between commit and manifest, or an older jaxgpt
        return meta
    try:
        with open(mpath) as f:
            files = json.load(f)["files"]
        files = {str(k): (int(v[0]), int(v[1])) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise _Bad("damaged", f"its {MANIFEST} is unreadable") from None
    for rel, (size, crc) in files.items():
        p = os.path.join(step_dir, rel)
        try:
            got = os.path.getsize(p)
        except OSError:
            raise _Bad("damaged", f"{rel} is missing") from None
        if got != size:
            raise _Bad("damaged", f"{rel} is {got} bytes, {size} when written (truncated or overwritten)")
        if deep and rel.split(os.sep)[0] in items and _file_crc(p) != crc:
            raise _Bad("damaged", f"{rel} does not match its checksum (changed on disk)")
    meta["_verified"] = True
    return meta


def _restore(ckpt_dir: str, step: int, item: str, target, keep_sharding: bool = False):
    path = os.path.abspath(os.path.join(ckpt_dir, str(step), item))  # Orbax takes absolute paths only
    try:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as c:
            return c.restore(path, args=ocp.args.StandardRestore(_abstract(target, keep_sharding)))
    except Exception:
        _drop_closed_loop_noise()
        raise


def _drop_unretrieved(record: logging.LogRecord) -> bool:
    return "exception was never retrieved" not in record.getMessage()


def _drop_closed_loop_noise() -> None:
    """A failed Orbax restore leaves tensorstore reads in flight; when they land, their callbacks
    find Orbax's event loop closed, and Python prints that RuntimeError as an "unraisable"
    traceback. Likewise the other reads of a restore into device shardings, closed when one of
    them failed: Orbax wraps their GeneratorExit in an exception. Drop exactly those; anything
    else still goes to the previous hook."""
    prev = sys.unraisablehook
    if getattr(prev, "jaxgpt_closed_loop", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        code = getattr(getattr(unraisable, "object", None), "cr_code", None)
        if isinstance(e.__cause__, GeneratorExit) and code is not None and \
                f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        prev(unraisable)

    hook.jaxgpt_closed_loop = True
    sys.unraisablehook = hook


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _folder_steps(ckpt_dir: str) -> list[int]:
    if os.path.isfile(ckpt_dir):
        raise UserError(f"{ckpt_dir} is a file, not a checkpoint folder (give the run folder that "
                        "holds the numbered step folders)")
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"checkpoint folder not found: {ckpt_dir}")
    steps = _step_numbers(ckpt_dir)
    if not steps:
        raise UserError(f"no jaxgpt checkpoint in {ckpt_dir} (expected numbered step folders "
                        "written by `jaxgpt train` or `jaxgpt convert`)")
    return steps


def _scan(ckpt_dir: str, items: tuple) -> tuple[dict[int, dict], dict[int, _Bad]]:
    """Cheap checks of every step: ({step: meta} of the usable ones, {step: problem})."""
    steps = _folder_steps(ckpt_dir)
    ok, bad = {}, {}
    for s in steps:
        try:
            ok[s] = _check(ckpt_dir, s, items, deep=False)
        except _Bad as b:
            bad[s] = b
    future = [s for s, b in bad.items() if b.kind == "future"]
    if future:
        raise UserError(f"{ckpt_dir} step {future[-1]}: {bad[future[-1]].why}")
    if not ok and all(b.kind == "foreign" for b in bad.values()):
        s = steps[-1]
        raise UserError(f"{ckpt_dir} step {s} is not a jaxgpt checkpoint: {bad[s].why}")
    return ok, bad


def _none_intact(ckpt_dir: str, bad: dict) -> UserError:
    listed = "; ".join(f"step {s}: {bad[s].why}" for s in sorted(bad, reverse=True)[:4])
    return UserError(f"no intact checkpoint in {ckpt_dir} ({listed}); nothing was changed")


def list_steps(ckpt_dir: str) -> list[int]:
    """Every step folder of a run folder (intact or not); UserError if there is none."""
    return _folder_steps(ckpt_dir)


def _best_first(ok: dict[int, dict]) -> list[int]:
    """Steps by val metric (best first; the earliest on ties, the first to reach it, as
    retention keeps), then the unscored newest first."""
    scored = sorted((metric_of(m)[1], s) for s, m in ok.items() if metric_of(m) is not None)
    rest = sorted((s for s in ok if metric_of(ok[s]) is None), reverse=True)
    return [s for _, s in scored] + rest


def read_meta(ckpt_dir: str, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of `step`, else of the best intact checkpoint by val metric, else the latest."""
    ok, bad = _scan(ckpt_dir, ("params",))
    if step is not None:
        _require(ckpt_dir, step, ok, bad)
        chosen = step
    elif not ok:
        raise _none_intact(ckpt_dir, bad)
    else:
        chosen = _best_first(ok)[0]
    meta = dict(ok[chosen])
    meta.pop("_verified", None)
    return chosen, meta


def _require(ckpt_dir: str, step: int, ok: dict, bad: dict) -> None:
    if step in bad:
        raise UserError(f"{ckpt_dir} step {step} is {'damaged' if bad[step].kind == 'damaged' else 'unusable'}: "
                        f"{bad[step].why}")
    if step not in ok:
        raise UserError(f"no checkpoint at step {step} in {ckpt_dir}; available steps: "
                        f"{sorted(ok) + sorted(bad)}")


# ----------------------------------------------------------------------------- loading

def load_model(ckpt_dir: str, step: int | None = None, dtype=None, attention: str = "auto",
               mesh=None):
    """Restore params only, with the config stored in the checkpoint: (model, Config, meta).

    Without `step`: the best intact checkpoint by val metric (else the latest); a damaged one
    is skipped with a one-line warning. With `step`: that one, or a one-line error.
    dtype: the compute dtype to serve in (default: the run's `dtype`, whose "auto" means
    bfloat16 on GPU/TPU, float32 on CPU); params stay float32 whatever it is. attention: the
    backend (default auto: the best for this platform, whatever the run trained with).
    mesh: a jax.sharding.Mesh (axes among data, fsdp, tensor): the params are restored straight
    into their shardings on it (jaxgpt/train/parallel.py's rules), each device reading only its
    shards; default: whole, on the first device, whatever layout wrote the checkpoint.
    """
    from jaxgpt.model import abstract_model

    ok, bad = _scan(ckpt_dir, ("params",))
    if step is not None:
        _require(ckpt_dir, step, ok, bad)
        order = [step]
    else:
        order = _best_first(ok)
        for s in sorted(bad, reverse=True):
            _warn(f"ignoring damaged checkpoint {ckpt_dir} step {s}: {bad[s].why}")
    for s in order:
        try:
            meta = _check(ckpt_dir, s, ("params",), deep=True)
        except _Bad as b:
            if step is not None:
                raise UserError(f"{ckpt_dir} step {s} is damaged: {b.why}") from None
            _warn(f"skipping damaged checkpoint {ckpt_dir} step {s}: {b.why}")
            bad[s] = b
            continue
        meta.pop("_verified", None)
        try:
            cfg = Config.from_dict(meta["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{ckpt_dir} step {s}: its metadata holds no valid config ({e})") from None
        try:
            model = abstract_model(cfg.model, dtype or cfg.dtype, attention)
        except (ValueError, TypeError) as e:
            raise UserError(f"cannot serve {ckpt_dir} that way: {e}") from None
        target = model_params(model)
        if mesh is not None:
            from jaxgpt.train.parallel import model_shardings
            target = sharded_target(target, model_shardings(mesh, model))
        try:
            params = _restore(ckpt_dir, s, "params", target, keep_sharding=mesh is not None)
        except Exception as e:
            why = f"could not restore its params ({type(e).__name__}: {_first_line(e)})"
            if step is not None:
                raise UserError(f"{ckpt_dir} step {s} is damaged: {why}") from None
            _warn(f"skipping damaged checkpoint {ckpt_dir} step {s}: {why}")
            bad[s] = _Bad("damaged", why)
            continue
        state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, params))
        nnx.update(model, state)
        return model, cfg, meta
    raise _none_intact(ckpt_dir, bad)


class Resume:
    """Where a resumed run starts: the newest intact checkpoint of `out`.

    `meta` is the newest usable-looking step's meta (for the config checks before the model is
    built); `restore` then tries the steps newest first, each checked (sizes and CRCs when a
    manifest exists) and really restored. A damaged one is reported in one line and, once an
    intact one is found, moved aside to `<step>.damaged` (it would collide with the next save
    of that step); nothing is deleted. If none is intact: a one-line error, nothing moved."""

    def __init__(self, ckpt_dir: str):
        self.directory = ckpt_dir
        self.ok, self.bad = _scan(ckpt_dir, ("params", "train"))
        foreign = [s for s, b in self.bad.items() if b.kind == "foreign"]
        if foreign:
            raise UserError(f"{ckpt_dir} holds step folders jaxgpt did not write (step {foreign[-1]}: "
                            f"{self.bad[foreign[-1]].why}); use another out= folder")
        if not self.ok:
            raise _none_intact(ckpt_dir, self.bad)
        self.meta = self.ok[max(self.ok)]

    def restore(self, params_target, train_target):
        """(step, params, train, meta) of the newest intact checkpoint. Targets: arrays (restored
        as host arrays) or ShapeDtypeStructs (with a sharding: restored into it)."""
        for s in sorted(self.ok, reverse=True):
            meta: dict = {}
            try:
                meta = _check(self.directory, s, ("params", "train"), deep=True)
                params = _restore(self.directory, s, "params", params_target, keep_sharding=True)
                train = _restore(self.directory, s, "train", train_target, keep_sharding=True)
            except _Bad as b:
                self.bad[s] = b
                continue
            except Exception as e:
                if meta.get("_verified"):  # its files are as written: not damage, a mismatch
                    raise UserError(f"cannot resume from {self.directory} step {s}: its files are "
                                    f"intact but do not fit this run's config ({type(e).__name__}: "
                                    f"{_first_line(e)}); use the run's config or a new out= folder") from None
                self.bad[s] = _Bad("damaged", f"its restore failed ({type(e).__name__}: {_first_line(e)})")
                continue
            meta.pop("_verified", None)
            self._move_aside_damaged(s)
            return s, params, train, meta
        raise _none_intact(self.directory, self.bad)

    def _move_aside_damaged(self, restored: int) -> None:
        if jax.process_index() != 0:  # one process renames (every process restored the same step)
            return
        for s in sorted(self.bad, reverse=True):
            src = os.path.join(self.directory, str(s))
            dst, n = f"{src}.damaged", 1
            while os.path.exists(dst):
                dst, n = f"{src}.damaged{n}", n + 1
            try:
                os.rename(src, dst)
            except OSError as e:
                raise UserError(f"checkpoint step {s} in {self.directory} is damaged ({self.bad[s].why}) "
                                f"and could not be moved aside: {e.strerror or e}") from None
            _warn(f"checkpoint step {s} in {self.directory} is damaged ({self.bad[s].why}); moved it "
                  f"to {os.path.basename(dst)}; resuming from step {restored}")


def restore_train_state(ckpt_dir: str, params_target, train_target, step: int | None = None):
    """(step, params, train, meta) for resume: `step`, else the newest intact checkpoint (a
    damaged newer one is reported and moved aside, as `Resume` does)."""
    if step is None:
        return Resume(ckpt_dir).restore(params_target, train_target)
    ok, bad = _scan(ckpt_dir, ("params", "train"))
    _require(ckpt_dir, step, ok, bad)
    try:
        meta = _check(ckpt_dir, step, ("params", "train"), deep=True)
        params = _restore(ckpt_dir, step, "params", params_target, keep_sharding=True)
        train = _restore(ckpt_dir, step, "train", train_target, keep_sharding=True)
    except _Bad as b:
        raise UserError(f"{ckpt_dir} step {step} is damaged: {b.why}") from None
    except Exception as e:
        raise UserError(f"could not restore {ckpt_dir} step {step}: {type(e).__name__}: "
                        f"{_first_line(e)}") from None
    meta.pop("_verified", None)
    return step, params, train, meta


def save_model_checkpoint(ckpt_dir: str, model, config: Config, meta: dict | None = None,
                          step: int = 0) -> None:
    """Write a params-only checkpoint (conversion, tests). `meta` must name the tokenizer."""
    meta = dict(meta or {})
    meta.setdefault("tokenizer", "gpt2")
    meta["config"] = config.to_dict()
    writer = CheckpointWriter(ckpt_dir, keep=1_000_000)
    try:
        writer.save(step, model_params(model), {"step": np.int64(step)}, meta)
    finally:
        writer.close()
