"""`jaxgpt prepare`: text, folders, the Python stdlib or JSONL -> token files for training.

Output layout (a "data folder"), flat arrays exactly like nanoGPT's so its data folders load too:
  train.bin, val.bin           token ids, raw little-endian uint16 (uint32 if n_vocab > 65536)
  meta.json                    what produced them (see `prepare`); written last
  .prepare-incomplete          present only while a re-prepare replaces the files of an existing
                               folder: `load_meta` refuses a folder that has it
and for document kinds (JSONL input), per split:
  {split}_offsets.npy          int64 [n_docs + 1]: doc i is bin[offsets[i]:offsets[i+1]]
  {split}_prompt_lens.npy      int32 [n_docs] (sft): the first n ids of a doc are the prompt
  {split}_labels.npy           int32 [n_docs] (classify): index into meta["labels"]
Every document ends with eot, so the bins are also valid plain token streams.

Streams (a file, a folder, `stdlib`) are split nanoGPT-style: the last `val_fraction` of the
token stream is validation. Documents are shuffled with `seed` and split per document; for
classification per label (stratified), so every label seen in val was also seen in training.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sysconfig
import uuid

import numpy as np

from jaxgpt.errors import UserError
from jaxgpt.tokenizer import TOKENIZERS, Tokenizer, get_tokenizer

DATA_FORMAT = "jaxgpt-data-1"
KINDS = ("stream", "documents", "sft", "classify")
SPLITS = ("train", "val")
STDLIB = "stdlib"
# Every file name prepare may write: stale ones from an older prepare of another kind are removed.
_ALL_FILES = ("train.bin", "val.bin", "meta.json") + tuple(
    f"{s}_{x}.npy" for s in SPLITS for x in ("offsets", "prompt_lens", "labels"))
_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
INCOMPLETE = ".prepare-incomplete"


def storage_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if n_vocab <= 2**16 else np.dtype(np.uint32)


# ----------------------------------------------------------------------------- reading inputs

def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _decode_text(raw: bytes) -> str | None:
    """The file's text, or None for binary / non-UTF-8 content. A NUL byte is the cheap tell
    of a binary file that happens to decode (UTF-16 text, images with ASCII headers)."""
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8-sig")  # a BOM is an encoding marker, not text to learn
    except UnicodeDecodeError:
        return None


def _folder_files(root: str, suffix: str = "", skip_dirs: frozenset[str] = frozenset(),
                  exclude: str | None = None) -> list[str]:
    """Files under `root`, recursively, sorted by relative path so the stream is reproducible.
    Hidden entries (.git, .DS_Store) are skipped: they are tooling, not corpus. So is `exclude`,
    the output folder when it lives inside the input (its meta.json is not corpus either)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs
                       and os.path.abspath(os.path.join(dirpath, d)) != exclude]
        for f in filenames:
            if not f.startswith(".") and f.endswith(suffix):
                found.append(os.path.relpath(os.path.join(dirpath, f), root))
    return [os.path.join(root, p) for p in sorted(found, key=lambda p: p.split(os.sep))]


def _stdlib_files() -> list[str]:
    """The installed standard library's own .py source: test suites and third-party packages
    excluded (they are huge, repetitive, or not the stdlib)."""
    root = sysconfig.get_paths()["stdlib"]
    files = _folder_files(root, ".py", frozenset(_SKIP_DIRS))
    if not files:
        raise UserError(f"no standard library .py source found under {root}")
    return files


def _read_stream(source: str, max_files: int | None, out_dir: str) -> tuple[list[str], int]:
    """(texts, number of skipped non-text files) for a stream source."""
    if source == STDLIB:
        paths = _stdlib_files()
    elif os.path.isdir(source):
        paths = _folder_files(source, exclude=os.path.abspath(out_dir))
    else:
        text = _decode_text(_read_bytes(source))
        if text is None:
            raise UserError(f"{source} is not a UTF-8 text file")
        return [text], 0
    if max_files is not None:
        paths = paths[:max_files]
    texts, skipped = [], 0
    for p in paths:
        try:
            with open(p, "rb") as f:
                text = _decode_text(f.read())
        except OSError:  # unreadable (permissions, dangling link): like binary, skip and count
            text = None
        if text is None:
            skipped += 1
        elif text:
            texts.append(text)
    if not texts:
        raise UserError(f"no UTF-8 text found in {source} ({skipped} non-text files skipped)")
    return texts, skipped


def _record_kind(obj: dict) -> str | None:
    if "prompt" in obj and "completion" in obj:
        return "sft"
    if "text" in obj and "label" in obj:
        return "classify"
    if "text" in obj:
        return "documents"
    return None


_FIELDS = {"documents": ("text",), "sft": ("prompt", "completion"), "classify": ("text", "label")}


def read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file (a BOM dropped); unreadable or non-UTF-8 is a UserError."""
    raw = _read_bytes(path)
    try:
        return raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def json_object(line: str, where: str, expected: str = "a JSON object") -> dict:
    """One JSONL line as a dict; anything else is a UserError naming `where`."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected {expected}, got {type(obj).__name__}")
    return obj


def _read_jsonl(path: str) -> tuple[str, list[dict]]:
    """(kind, records). The first record fixes the kind; every other line must match it."""
    kind, first, records = None, 0, []
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        obj = json_object(line, where)
        this = _record_kind(obj)
        if kind is None:
            if this is None:
                raise UserError(f"{where}: expected keys 'text' (documents), 'prompt' and 'completion' "
                                f"(sft) or 'text' and 'label' (classify); got {sorted(obj)}")
            kind, first = this, lineno
        missing = [k for k in _FIELDS[kind] if k not in obj]
        if missing:
            raise UserError(f"{where}: missing field {missing[0]!r} (line {first} "
                            f"made this a {kind} file)")
        if this != kind:
            raise UserError(f"{where}: a {this} record in a {kind} file (line {first} "
                            f"decided the kind; every line must have the same kind)")
        for k in _FIELDS[kind]:
            v = obj[k]
            ok = (isinstance(v, (str, int)) and not isinstance(v, bool)) if k == "label" else isinstance(v, str)
            if not ok:
                want = "a string or integer" if k == "label" else "a string"
                raise UserError(f"{where}: field {k!r} must be {want}, got {type(v).__name__}")
        records.append(obj)
    if not records:
        raise UserError(f"{path} has no records")
    return kind, records


# ----------------------------------------------------------------------------- splitting

def _n_val(n: int, val_fraction: float) -> int:
    """Validation share of n items: rounded, but at least 1 and never all of them."""
    if n < 2:
        return 0
    return min(n - 1, max(1, int(n * val_fraction + 0.5)))


def _split_docs(n: int, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(n)
    n_train = n - _n_val(n, val_fraction)
    return perm[:n_train], perm[n_train:]


def _split_stratified(label_ids: np.ndarray, val_fraction: float,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-label split: each label sends ~val_fraction of its examples to val but keeps at least
    one in train, so by construction no val label is unseen in training."""
    groups = [rng.permutation(np.flatnonzero(label_ids == c)) for c in np.unique(label_ids)]
    n_val = [min(len(g) - 1, int(len(g) * val_fraction + 0.5)) for g in groups]
    if sum(n_val) == 0 and len(label_ids) >= 2:
        # Tiny classes all rounded to zero: take one example from the largest class that can
        # spare it, so there is always something to validate on.
        largest = max(range(len(groups)), key=lambda i: len(groups[i]))
        if len(groups[largest]) >= 2:
            n_val[largest] = 1
    train = np.concatenate([g[k:] for g, k in zip(groups, n_val)])
    val = np.concatenate([g[:k] for g, k in zip(groups, n_val)])
    # Shuffle across labels too: a loader reading in order must not see one class at a time.
    return rng.permutation(train), rng.permutation(val)


def _label_names(raw: list) -> list[str]:
    """Sorted label names. All-integer labels sort numerically, so labels 0..K-1 keep their
    value as index (string order would put "10" before "2")."""
    if all(isinstance(v, int) for v in raw):
        return [str(v) for v in sorted(set(raw))]
    return sorted({str(v) for v in raw})


# ----------------------------------------------------------------------------- tokenizing

def _concat_docs(docs: list[np.ndarray], order: np.ndarray, eot: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, offsets): docs[order] each followed by eot."""
    lens = np.array([len(docs[i]) + 1 for i in order], dtype=np.int64)
    offsets = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    tokens = np.full(int(offsets[-1]), eot, dtype=dtype)
    for start, i in zip(offsets[:-1], order):
        tokens[start:start + len(docs[i])] = docs[i]
    return tokens, offsets


def _prepare_stream(texts: list[str], tok: Tokenizer, val_fraction: float, dtype) -> dict[str, np.ndarray]:
    pieces = tok.encode_arrays(texts, dtype)
    eot = np.array([tok.eot_id], dtype=dtype)
    stream = np.concatenate([x for p in pieces for x in (eot, p)][1:])  # eot *between* texts
    if not (stream != tok.eot_id).any():
        raise UserError("the input has no text to tokenize")
    n_val = _n_val(len(stream), val_fraction)
    if n_val == 0:
        raise UserError(f"the input is only {len(stream)} token; need at least 2 for train and val")
    return {"train.bin": stream[:-n_val], "val.bin": stream[-n_val:]}


def _prepare_docs(kind: str, records: list[dict], tok: Tokenizer, val_fraction: float,
                  seed: int, dtype) -> tuple[dict[str, np.ndarray], dict]:
    rng = np.random.default_rng(seed)
    extra_meta: dict = {}
    per_doc: dict[str, np.ndarray] = {}
    if kind == "sft":
        prompts = tok.encode_arrays([r["prompt"] for r in records], dtype)
        completions = tok.encode_arrays([r["completion"] for r in records], dtype)
        docs = [np.concatenate([p, c]) for p, c in zip(prompts, completions)]
        per_doc["prompt_lens"] = np.array([len(p) for p in prompts], dtype=np.int32)
    else:
        docs = tok.encode_arrays([r["text"] for r in records], dtype)
    if not any(len(d) for d in docs):
        raise UserError("the input has no text to tokenize (every record is empty)")

    if kind == "classify":
        labels = _label_names([r["label"] for r in records])
        index = {name: i for i, name in enumerate(labels)}
        label_ids = np.array([index[str(r["label"])] for r in records], dtype=np.int32)
        per_doc["labels"] = label_ids
        extra_meta["labels"] = labels
        train, val = _split_stratified(label_ids, val_fraction, rng)
    else:
        train, val = _split_docs(len(docs), val_fraction, rng)

    if len(val) == 0:
        # Every data folder has both splits non-empty, so training can always evaluate.
        need = "a label with at least 2 examples" if kind == "classify" else "at least 2 records"
        raise UserError(f"too few records for a validation split: need {need}")
    arrays: dict[str, np.ndarray] = {}
    for split, order in zip(SPLITS, (train, val)):
        tokens, offsets = _concat_docs(docs, order, tok.eot_id, dtype)
        arrays[f"{split}.bin"] = tokens
        arrays[f"{split}_offsets.npy"] = offsets
        for name, values in per_doc.items():
            arrays[f"{split}_{name}.npy"] = values[order]
        extra_meta[f"{split}_docs"] = int(len(order))
    return arrays, extra_meta


# ----------------------------------------------------------------------------- writing

def _write_atomically(out_dir: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """All files are written into a temp folder beside out_dir, then moved in with renames.

    A fresh out_dir appears in one rename. An existing one may hold other things (often the
    input text itself), so only our files are replaced, meta.json last, under an INCOMPLETE
    marker created first and removed last: a kill mid-way leaves a folder that `load_meta`
    refuses (a train.bin without meta.json would otherwise pass for a nanoGPT folder).
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir} exists and is not a folder")
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        # os.mkdir, not mkdtemp: its 0700 mode would stick to the renamed folder.
        tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{uuid.uuid4().hex[:12]}")
        os.mkdir(tmp)
    except OSError as e:
        raise UserError(f"cannot write to {parent}: {e.strerror}") from None
    try:
        for name, arr in arrays.items():
            path = os.path.join(tmp, name)
            if name.endswith(".bin"):
                arr.tofile(path)
            else:
                np.save(path, arr)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        if not os.path.exists(out_dir):
            os.rename(tmp, out_dir)
            return
        marker = os.path.join(out_dir, INCOMPLETE)
        with open(marker, "w") as f:
            f.write("an interrupted `jaxgpt prepare` was replacing these files; run it again\n")
        old_meta = os.path.join(out_dir, "meta.json")
        if os.path.exists(old_meta):
            os.remove(old_meta)
        for name in _ALL_FILES:
            if name != "meta.json" and name not in arrays and os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))  # stale file of another kind
        for name in [*arrays, "meta.json"]:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        os.remove(marker)
    except OSError as e:
        raise UserError(f"cannot write {out_dir}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- public API

def prepare(input: str, out_dir: str, tokenizer: str = "gpt2", val_fraction: float = 0.1,
            seed: int = 0, quiet: bool = False, max_files: int | None = None) -> dict:
    """Tokenize `input` into the data folder `out_dir`; returns the meta.json contents.

    input: a UTF-8 text file, a folder of them (recursive; non-text files skipped and counted),
      the word "stdlib" (this Python's standard library source: the built-in default corpus),
      or a .jsonl file of {"text"} documents, {"prompt", "completion"} SFT pairs or
      {"text", "label"} classification examples.
    max_files: use only the first N files of a folder / stdlib (for quick tests).
    Nothing is written unless everything succeeds.
    """
    input = os.fspath(input)
    if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction <= 0.5):
        raise UserError(f"--val-fraction must be in (0, 0.5], got {val_fraction}")
    if tokenizer not in TOKENIZERS:
        raise UserError(f"unknown tokenizer {tokenizer!r}; valid names: {', '.join(TOKENIZERS)}")
    if input != STDLIB and not os.path.exists(input):
        raise UserError(f"--input {input} does not exist (give a text file, a folder, a .jsonl file, "
                        f"or the word {STDLIB!r})")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir} exists and is not a folder")
    tok = get_tokenizer(tokenizer)
    dtype = storage_dtype(tok.n_vocab)
    meta: dict = {"format": DATA_FORMAT}
    if os.path.isfile(input) and input.lower().endswith(".jsonl"):
        kind, records = _read_jsonl(input)
        arrays, extra = _prepare_docs(kind, records, tok, val_fraction, seed, dtype)
    else:
        kind = "stream"
        texts, skipped = _read_stream(input, max_files, out_dir)
        arrays = _prepare_stream(texts, tok, val_fraction, dtype)
        extra = {"files": len(texts), "skipped_files": skipped}
    meta.update(kind=kind, tokenizer=tok.name, vocab_size=tok.n_vocab, eot_id=tok.eot_id,
                dtype=dtype.name, train_tokens=int(arrays["train.bin"].size),
                val_tokens=int(arrays["val.bin"].size),
                max_token_id=int(max(int(arrays[f"{s}.bin"].max()) for s in SPLITS)))
    meta.update(extra)
    meta["source"] = input
    _write_atomically(out_dir, arrays, meta)
    if not quiet:
        docs = (f", {meta['train_docs']:,}/{meta['val_docs']:,} docs" if "train_docs" in meta else "")
        skipped = f", skipped {meta['skipped_files']} non-text files" if meta.get("skipped_files") else ""
        labels = f", {len(meta['labels'])} labels" if "labels" in meta else ""
        print(f"prepared {input} -> {out_dir}: {kind}, {tok.name} tokenizer ({tok.n_vocab} ids, {dtype.name}), "
              f"train/val {meta['train_tokens']:,}/{meta['val_tokens']:,} tokens{docs}{labels}{skipped}")
    return meta


class _PlainUnpickler(pickle.Unpickler):
    """nanoGPT's meta.pkl is a dict of ints and strings; refusing every class means a hostile
    pickle cannot run code when a folder is loaded."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"meta.pkl refers to {module}.{name}")


def _no_data(data_dir: str) -> UserError:
    return UserError(f"no prepared data in {data_dir}; run `jaxgpt prepare --input ... --out {data_dir}`")


def load_meta(data_dir: str) -> dict:
    """The meta of a data folder, validated against the files on disk.

    A folder with only train.bin/val.bin (+ optional meta.pkl) is a nanoGPT data folder: uint16
    stream data; without meta.pkl it is GPT-2 BPE (nanoGPT's convention), with one it uses the
    pickle's vocab_size and an unknown tokenizer (None).
    """
    data_dir = os.fspath(data_dir)
    if os.path.exists(os.path.join(data_dir, INCOMPLETE)):
        raise UserError(f"{data_dir} holds the half-replaced files of an interrupted `jaxgpt prepare`; "
                        "run it again")
    if not os.path.isfile(os.path.join(data_dir, "train.bin")):
        raise _no_data(data_dir)
    meta_path = os.path.join(data_dir, "meta.json")
    if os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"corrupt {meta_path}: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != DATA_FORMAT:
            raise UserError(f"corrupt {meta_path}: not a {DATA_FORMAT} file; re-run `jaxgpt prepare`")
        if meta.get("kind") not in KINDS or meta.get("dtype") not in ("uint16", "uint32"):
            raise UserError(f"corrupt {meta_path}: bad kind or dtype; re-run `jaxgpt prepare`")
        if not (isinstance(meta.get("vocab_size"), int) and meta["vocab_size"] >= 1):
            raise UserError(f"corrupt {meta_path}: bad vocab_size; re-run `jaxgpt prepare`")
    else:
        meta = {"format": "nanogpt", "kind": "stream", "tokenizer": "gpt2", "vocab_size": 50257,
                "eot_id": 50256, "dtype": "uint16"}
        pkl = os.path.join(data_dir, "meta.pkl")
        if os.path.exists(pkl):
            try:
                with open(pkl, "rb") as f:
                    vocab_size = _PlainUnpickler(f).load()["vocab_size"]
            except Exception as e:  # any unpickling failure means the same thing to the user
                raise UserError(f"corrupt {pkl}: {type(e).__name__}: {e}") from None
            if not isinstance(vocab_size, int) or not 0 < vocab_size <= 2**16:
                raise UserError(f"corrupt {pkl}: vocab_size {vocab_size!r}")
            meta.update(tokenizer=None, vocab_size=vocab_size, eot_id=None)
        meta["source"] = data_dir
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.isfile(path):
            raise UserError(f"corrupt data folder {data_dir}: {split}.bin is missing")
        size = os.path.getsize(path)
        if size % itemsize:
            raise UserError(f"corrupt {path}: {size} bytes is not a whole number of {meta['dtype']} tokens")
        n = size // itemsize
        if f"{split}_tokens" in meta and meta[f"{split}_tokens"] != n:
            raise UserError(f"corrupt {path}: {n} tokens but meta.json says {meta[f'{split}_tokens']}")
        meta[f"{split}_tokens"] = n
        if meta["kind"] != "stream":
            needed = ["offsets"] + {"sft": ["prompt_lens"], "classify": ["labels"]}.get(meta["kind"], [])
            for name in needed:
                if not os.path.isfile(os.path.join(data_dir, f"{split}_{name}.npy")):
                    raise UserError(f"corrupt data folder {data_dir}: {split}_{name}.npy is missing")
    _check_token_range(data_dir, meta)
    return meta


_MAX_SEEN: dict = {}  # (path, size, mtime) -> largest token id, for folders that do not record it


def _largest_id(path: str, dtype: str) -> int:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _MAX_SEEN:
        tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r") if st.st_size else np.zeros(0, np.uint16)
        top = -1
        for i in range(0, len(tokens), 1 << 26):  # ~128 MB of uint16 at a time
            top = max(top, int(tokens[i:i + (1 << 26)].max()))
        _MAX_SEEN[key] = top
    return _MAX_SEEN[key]


def _check_token_range(data_dir: str, meta: dict) -> None:
    """Every token id must be below vocab_size: an id past it would silently index the padded
    rows of the embedding. `prepare` records the largest id in meta.json. A split of up to 1 GiB
    is scanned anyway (well under a second, once per process), so a .bin swapped behind
    meta.json's back is caught too; a larger one is trusted to its recorded value, and only
    scanned (once per process) when there is none (nanoGPT folders, older prepares)."""
    vocab = int(meta["vocab_size"])
    recorded = meta.get("max_token_id")
    if recorded is not None and (not isinstance(recorded, int) or recorded >= vocab):
        raise UserError(f"corrupt data folder {data_dir}: meta.json's max_token_id {recorded!r} "
                        f"is not below its vocab_size {vocab}; re-run `jaxgpt prepare`")
    for split in SPLITS:
        path = os.path.join(data_dir, f"{split}.bin")
        if recorded is not None and os.path.getsize(path) > _SCAN_LIMIT:
            continue
        top = _largest_id(path, meta["dtype"])
        if top >= vocab:
            raise UserError(f"{path} holds token id {top}, outside the vocabulary of {vocab} ids "
                            "(prepared with another tokenizer, or corrupt); re-run `jaxgpt prepare`")


_SCAN_LIMIT = 1 << 30


