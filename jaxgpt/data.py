"""Static-shape training batches read from a folder written by `jaxgpt prepare`.

Every batch is a pure function of (seed, split, step): a resumed run sees exactly the batches an
uninterrupted one would, and the eval batches are the same at every evaluation. That is also
what lets the training loop build step s+1's batch on a thread while step s runs
(jaxgpt/train/prefetch.py), and each process of a multi-host run build only its own rows.

Batch dicts (numpy, global batch B, block size T):
  lm / sft:  tokens (B, T+1) int32, mask (B, T) float32 — mask[b, t] weights the loss of
             predicting tokens[b, t+1]; 0 on padding (and on the prompt for sft).
  classify:  tokens (B, T) int32, lengths (B,) int32, labels (B,) int32, weight (B,) float32.
Documents are right-padded with the end-of-text id. Right padding is safe under causal attention:
a real token never attends to the padding after it. For task=lm on {"text"} documents a row is
BOS + text + EOS, both being the end-of-text id, so the first token is learned too and generation
from the empty prompt (which `generate` turns into end-of-text) starts a document.
"""

from __future__ import annotations

import os
import queue
import threading

import numpy as np

from jaxgpt.errors import UserError

SPLITS = {"train": 0, "val": 1}
_EVAL_TAG = 7919  # a different seed stream for the fixed eval batches


def _rng(seed: int, split: str, step: int, tag: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], step, tag])


class Dataset:
    """One split's tokens (memory-mapped) and, for document data, the document table."""

    def __init__(self, data_dir: str, split: str, meta: dict):
        self.meta, self.split = meta, split
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.isfile(path):
            raise UserError(f"missing {path}; run `jaxgpt prepare --input ... --out {data_dir}`")
        self.tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
        self.kind = meta.get("kind", "stream")
        self.eot = int(meta.get("eot_id") if meta.get("eot_id") is not None else 0)
        self.offsets = self.prompt_lens = self.labels = None
        if self.kind != "stream":
            def load(name, required=True):
                p = os.path.join(data_dir, f"{split}_{name}.npy")
                if not os.path.isfile(p):
                    if required:
                        raise UserError(f"corrupt data folder {data_dir}: missing {os.path.basename(p)}")
                    return None
                return np.load(p)
            self.offsets = load("offsets").astype(np.int64)
            if self.offsets[-1] != len(self.tokens):
                raise UserError(f"corrupt data folder {data_dir}: {split} offsets do not match {split}.bin")
            self.prompt_lens = load("prompt_lens", self.kind == "sft")
            self.labels = load("labels", self.kind == "classify")

    @property
    def n_docs(self) -> int:
        return 0 if self.offsets is None else len(self.offsets) - 1

    def doc(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[i]:self.offsets[i + 1]], dtype=np.int32)


class Batcher:
    """Builds the batches of one task from one split at a fixed (batch_size, block_size).

    rows=(lo, hi): build only rows lo..hi-1 of each global batch (a process of a multi-host run
    reads only its rows). Every random draw is still made for all batch_size rows, so a row is
    the same whichever process builds it.
    """

    def __init__(self, ds: Dataset, task: str, batch_size: int, block_size: int, seed: int,
                 rows: tuple[int, int] | None = None):
        self.ds, self.task, self.B, self.T, self.seed = ds, task, batch_size, block_size, seed
        self.lo, self.hi = rows if rows is not None else (0, batch_size)
        self._ahead: _Prefetcher | None = None
        if not 0 <= self.lo < self.hi <= batch_size:
            raise ValueError(f"rows {rows} are not within a batch of {batch_size}")
        if ds.kind == "stream" and len(ds.tokens) < block_size + 1:
            raise UserError(f"model.block_size={block_size} is larger than the {ds.split} data "
                            f"({len(ds.tokens)} tokens); use a smaller block_size or more data")
        if ds.kind != "stream" and ds.n_docs == 0:
            raise UserError(f"the {ds.split} split has no documents")
        self.docs = None
        self.truncated = self.dropped = 0
        if task == "sft":
            self._plan_sft()

    # Examples longer than the window lose tokens from the left of the prompt (the completion
    # is what is learned); if even the completion does not fit, the example is dropped.
    def _plan_sft(self):
        keep = []
        for i in range(self.ds.n_docs):
            n = int(self.ds.offsets[i + 1] - self.ds.offsets[i])
            p = int(self.ds.prompt_lens[i])
            over = n - (self.T + 1)
            if over <= 0:
                keep.append(i)
            elif over < p:  # still >= 1 prompt token left to condition on
                keep.append(i)
                self.truncated += 1
            else:
                self.dropped += 1
        if not keep:
            raise UserError(f"every {self.ds.split} example is longer than block_size={self.T}")
        self.docs = np.asarray(keep)

    def _doc_ids(self, step: int, train: bool) -> tuple[np.ndarray, np.ndarray]:
        """Row -> document index, and row weight (0 for wrap-around rows of an eval pass)."""
        pool = self.docs if self.docs is not None else np.arange(self.ds.n_docs)
        if train:
            return _rng(self.seed, self.ds.split, step).choice(pool, self.B), np.ones(self.B, np.float32)
        idx = step * self.B + np.arange(self.B)  # eval walks the split in order
        return pool[idx % len(pool)], (idx < len(pool)).astype(np.float32)

    def eval_passes(self, eval_steps: int) -> int:
        """Eval batches per evaluation: the whole split if document-based and small enough."""
        if self.ds.kind == "stream":
            return eval_steps
        pool = len(self.docs) if self.docs is not None else self.ds.n_docs
        return max(1, min(eval_steps, -(-pool // self.B)))

    def prefetch(self, step: int, train: bool = True) -> None:
        """Start building `step`'s batch on a background thread; `batch(step)` then returns it
        (waiting for it if need be). The training loop asks for step s+1 right after
        dispatching step s, so the numpy work (memmap reads, document packing) overlaps the
        device's step instead of preceding it. One batch ahead: a step takes far longer than
        building its batch, and more would only hold more host memory."""
        if self._ahead is None:
            self._ahead = _Prefetcher(lambda key: self._build(*key))
        self._ahead.request((step, train))

    def batch(self, step: int, train: bool = True) -> dict:
        """The batch of `step`: the prefetched one when it was asked for, else built now (an
        error while prefetching is raised here, in the caller's thread)."""
        if self._ahead is not None and self._ahead.pending == (step, train):
            return self._ahead.take()
        return self._build(step, train)

    def close(self) -> None:
        """Stop the prefetch thread, if any."""
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None

    def _build(self, step: int, train: bool) -> dict:
        if self.task == "classify":
            return self._classify(step, train)
        n = self.hi - self.lo
        if self.ds.kind == "stream":
            rng = _rng(self.seed, self.ds.split, step, 0 if train else _EVAL_TAG)
            starts = rng.integers(0, len(self.ds.tokens) - self.T, self.B)[self.lo:self.hi]
            toks = np.stack([np.asarray(self.ds.tokens[s:s + self.T + 1], np.int32) for s in starts])
            return {"tokens": toks, "mask": np.ones((n, self.T), np.float32)}
        ids, weight = self._doc_ids(step, train)
        toks = np.full((n, self.T + 1), self.ds.eot, np.int32)
        mask = np.zeros((n, self.T), np.float32)
        rng = _rng(self.seed, self.ds.split, step, 1)
        bos = self.task == "lm" and self.ds.kind == "documents"
        if self.task != "sft":  # the window draws of the rows before ours, from lengths alone
            for i in ids[:self.lo]:
                length = int(self.ds.offsets[i + 1] - self.ds.offsets[i]) + bos
                if length > self.T + 1:
                    rng.integers(0, length - self.T)
        ids, weight = ids[self.lo:self.hi], weight[self.lo:self.hi]
        for r, i in enumerate(ids):
            d = self.ds.doc(i)
            if bos:
                d = np.concatenate([np.array([self.ds.eot], np.int32), d])
            first = 0  # first target index that counts
            if self.task == "sft":
                over = max(0, len(d) - (self.T + 1))
                first = int(self.ds.prompt_lens[i]) - over - 1  # predicting the 1st completion token
                d = d[over:]
            elif len(d) > self.T + 1:  # a long document: a random window of it
                s = int(rng.integers(0, len(d) - self.T))
                d = d[s:s + self.T + 1]
            toks[r, :len(d)] = d
            mask[r, first:len(d) - 1] = weight[r]
        return {"tokens": toks, "mask": mask}

    def _classify(self, step: int, train: bool) -> dict:
        ids, weight = self._doc_ids(step, train)
        ids, weight = ids[self.lo:self.hi], weight[self.lo:self.hi]
        toks = np.full((len(ids), self.T), self.ds.eot, np.int32)
        lengths = np.zeros(len(ids), np.int32)
        for r, i in enumerate(ids):
            d = self.ds.doc(i)[-self.T:]  # keep the end: the head reads the last token
            toks[r, :len(d)] = d
            lengths[r] = len(d)
        return {"tokens": toks, "lengths": np.maximum(lengths, 1),
                "labels": self.ds.labels[ids].astype(np.int32), "weight": weight}


class _Prefetcher:
    """`build(key)` on one daemon thread, for one key at a time (see `Batcher.prefetch`)."""

    def __init__(self, build):
        self._build = build
        self._requests: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self.pending = None  # the key requested and not yet taken
        self._thread = threading.Thread(target=self._work, name="jaxgpt-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (key := self._requests.get()) is not None:
            try:
                self._results.put((self._build(key), None))
            except BaseException as e:  # noqa: BLE001  handed to the caller's thread by take()
                self._results.put((None, e))

    def request(self, key) -> None:
        if self.pending is not None:  # an abandoned request: its result is dropped
            self.take_quietly()
        self.pending = key
        self._requests.put(key)

    def take(self):
        self.pending = None
        value, error = self._results.get()
        if error is not None:
            raise error
        return value

    def take_quietly(self) -> None:
        self.pending = None
        self._results.get()

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join(timeout=60)


def check_labels(train: Dataset, val: Dataset) -> None:
    """Every val label must be a known class that training sees: a class absent from training
    gets no gradient, so its val examples would only measure an untrained head. `prepare`
    splits per label and cannot produce this; a hand-assembled data folder can."""
    names = list(train.meta.get("labels") or [])
    for ds in (train, val):
        bad = ds.labels[(ds.labels < 0) | (ds.labels >= len(names))]
        if bad.size:
            raise UserError(f"corrupt {ds.split}_labels.npy: label index {int(bad[0])} is not in "
                            f"meta.json's {len(names)} labels")
    unseen = sorted(set(np.unique(val.labels).tolist()) - set(np.unique(train.labels).tolist()))
    if unseen:
        raise UserError(f"label {names[unseen[0]]!r} occurs in the val split but never in train; "
                        "re-run `jaxgpt prepare` (it splits every label between train and val)")


def check_task(task: str, kind: str) -> None:
    allowed = {"lm": ("stream", "documents", "sft"), "sft": ("sft",), "classify": ("classify",)}
    if kind not in allowed[task]:
        need = {"sft": "prompt/completion JSONL", "classify": "text/label JSONL"}.get(task, "text")
        raise UserError(f"task={task} does not match the data (kind '{kind}'); task={task} needs "
                        f"data prepared from {need}")
