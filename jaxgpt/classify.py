"""Label texts with a `task=classify` checkpoint: the Python API behind `jaxgpt classify`.

A text is fed exactly as training fed it: its tokens followed by the end-of-text id (`prepare`
ends every document with it, and the head reads the hidden state of a row's last real token,
i.e. that end-of-text token). Texts longer than block_size keep their last block_size tokens,
as the training batches do.

Texts are batched: rows right-padded with end-of-text, with per-row lengths. Right padding is
exact under causal attention (a token never sees the padding after it), so a text's
probabilities do not depend on what it is batched with. Shapes are bucketed (rows and
columns, see `jaxgpt.generation.bucket`), and the one jitted function takes the weights as
arguments, so a new batch of the same bucket reuses the compiled program.
"""

from __future__ import annotations

import collections
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.checkpoint import load_model
from jaxgpt.errors import UserError
from jaxgpt.generation import batch_bucket, bucket
from jaxgpt.prepare import json_object, read_lines
from jaxgpt.tokenizer import get_tokenizer

MAX_BATCH = 64  # rows per compiled call: bounds memory for a long --input file

# Traces of the jitted function (one per new shape): tests bound recompiles with it.
STATS: collections.Counter = collections.Counter()


@functools.partial(jax.jit, static_argnums=0)
def class_probs(graphdef, params, tokens_BxT, lengths_B):
    """Softmax class probabilities (B, C) float32 of right-padded rows with lengths_B >= 1."""
    STATS["trace:class_probs"] += 1
    model = nnx.merge(graphdef, params)
    return jax.nn.softmax(model.classify(tokens_BxT, lengths_B), axis=-1)


class Classifier:
    """A classification checkpoint ready to label texts (tokenizer and label names included)."""

    def __init__(self, ckpt_dir: str, step: int | None = None):
        model, cfg, meta = load_model(ckpt_dir, step)
        if cfg.task != "classify" or cfg.model.n_classes < 1:
            raise UserError(f"{ckpt_dir} holds a task={cfg.task} checkpoint, not a classifier "
                            "(train one with task=classify)")
        labels = (meta.get("data_meta") or {}).get("labels")
        if not isinstance(labels, list) or len(labels) != cfg.model.n_classes:
            raise UserError(f"{ckpt_dir}: the checkpoint's label names do not match its "
                            f"{cfg.model.n_classes} classes (corrupt metadata)")
        if not meta.get("tokenizer"):
            raise UserError(f"{ckpt_dir} does not name its tokenizer; cannot encode text for it")
        self.labels = [str(x) for x in labels]
        self.tokenizer = get_tokenizer(meta["tokenizer"])
        self.step = int(meta.get("step", 0))
        self.block_size = cfg.model.block_size
        self.graphdef, self.params = nnx.split(model)

    def encode(self, text: str) -> list[int]:
        """The ids the head sees: the text, then end-of-text; the last block_size of them."""
        return (self.tokenizer.encode(text) + [self.tokenizer.eot_id])[-self.block_size:]

    def probabilities(self, texts: Sequence[str], max_batch: int = MAX_BATCH) -> np.ndarray:
        """(len(texts), n_classes) float32 class probabilities, in the order of `texts`."""
        if isinstance(texts, str):
            raise UserError("probabilities() takes a list of texts, not one string")
        ids = [self.encode(t) for t in texts]
        if not ids:
            raise UserError("no texts to classify")
        out = []
        for lo in range(0, len(ids), max_batch):
            rows = ids[lo:lo + max_batch]
            B = batch_bucket(len(rows))
            T = min(bucket(max(len(r) for r in rows)), self.block_size)
            tokens = np.full((B, T), self.tokenizer.eot_id, np.int32)
            lengths = np.ones((B,), np.int32)  # dummy rows: one token, result dropped
            for i, r in enumerate(rows):
                tokens[i, :len(r)] = r
                lengths[i] = len(r)
            p = class_probs(self.graphdef, self.params, jnp.asarray(tokens), jnp.asarray(lengths))
            out.append(np.asarray(p)[:len(rows)])
        return np.concatenate(out)

    def predict(self, texts: Sequence[str], max_batch: int = MAX_BATCH) -> list[dict]:
        """Per text: {"text", "label" (the most probable), "probs" {label name: probability}}."""
        probs = self.probabilities(texts, max_batch)
        return [{"text": t, "label": self.labels[int(np.argmax(p))],
                 "probs": {name: float(v) for name, v in zip(self.labels, p)}}
                for t, p in zip(texts, probs)]


def classify(ckpt_dir: str, texts: Sequence[str], step: int | None = None) -> list[dict]:
    """One-call form of `Classifier(ckpt_dir, step).predict(texts)`."""
    return Classifier(ckpt_dir, step).predict(texts)


def read_texts(path: str) -> list[str]:
    """Texts of an input file: JSONL records with a string "text" field if the name ends in
    .jsonl, else one text per line. Blank lines are skipped; a file with no texts, an unreadable
    file or a malformed record is a UserError naming the line."""
    if not os.path.isfile(path):
        raise UserError(f"--input {path} not found")
    lines = read_lines(path)
    jsonl = path.lower().endswith(".jsonl")
    texts = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            texts.append(line)
            continue
        where = f"{path} line {lineno}"
        obj = json_object(line, where, "a JSON object with a 'text' field")
        if "text" not in obj:
            raise UserError(f"{where}: missing field 'text' (got {sorted(obj)})")
        if not isinstance(obj["text"], str):
            raise UserError(f"{where}: field 'text' must be a string, got {type(obj['text']).__name__}")
        texts.append(obj["text"])
    if not texts:
        raise UserError(f"{path} has no texts (expected one per line"
                        + (", as JSON objects with a 'text' field)" if jsonl else ")"))
    return texts
