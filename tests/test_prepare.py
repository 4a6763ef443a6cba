"""`jaxgpt prepare`: bins decode back to the input, splits are where they should be, JSONL
documents keep their boundaries and labels, bad input fails cleanly with nothing written."""

import json
import os
import pickle
import sysconfig
from collections import Counter

import numpy as np
import pytest

from jaxgpt.cli import main
from jaxgpt.errors import UserError
from jaxgpt.prepare import _stdlib_files, load_meta, prepare
from jaxgpt.tokenizer import get_tokenizer


def read_bin(data_dir, split, dtype=np.uint16):
    return np.fromfile(os.path.join(data_dir, f"{split}.bin"), dtype=dtype)


def read_docs(data_dir, split):
    tokens = read_bin(data_dir, split)
    offsets = np.load(os.path.join(data_dir, f"{split}_offsets.npy"))
    assert offsets.dtype == np.int64 and offsets[0] == 0 and offsets[-1] == len(tokens)
    return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


TEXT = "First line of text.\nSecond line, with 中文 and emoji 🎉.\r\n" * 40


@pytest.mark.parametrize("name", ["byte", "gpt2"])
def test_text_file_stream(tmp_path, name):
    src = tmp_path / "input.txt"
    src.write_bytes(TEXT.encode())
    out = str(tmp_path / "data")
    meta = prepare(str(src), out, tokenizer=name, val_fraction=0.25, quiet=True)
    tok = get_tokenizer(name)
    train, val = read_bin(out, "train"), read_bin(out, "val")
    ids = tok.encode(TEXT)
    # val is exactly the tail of the one token stream, a quarter of it
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)
    assert len(val) == round(0.25 * len(ids))
    assert tok.decode(np.concatenate([train, val])) == TEXT
    assert meta == load_meta(out) == json.load(open(os.path.join(out, "meta.json")))
    assert (meta["kind"], meta["tokenizer"], meta["vocab_size"], meta["eot_id"], meta["dtype"]) == (
        "stream", name, tok.n_vocab, tok.eot_id, "uint16")
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]
    assert sorted(os.listdir(tmp_path)) == ["data", "input.txt"]  # no temp folder left behind


def test_folder_sorted_with_eot_between_and_non_text_skipped(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    files = {"b.txt": "bee", "a.txt": "ay", "sub/x.md": "ex 中", "z.py": "zed"}
    for rel, text in files.items():
        (root / rel).write_text(text, encoding="utf-8")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))
    (root / ".git" / "config").write_text("[core]")
    (root / "empty.txt").write_text("")
    out = str(tmp_path / "data")
    meta = prepare(str(root), out, tokenizer="byte", val_fraction=0.1, quiet=True)
    stream = np.concatenate([read_bin(out, "train"), read_bin(out, "val")])
    expected = []
    for rel in ["a.txt", "b.txt", "sub/x.md", "z.py"]:  # sorted by path, separated by eot
        expected += [256] + list(files[rel].encode())
    np.testing.assert_array_equal(stream, expected[1:])
    assert (meta["files"], meta["skipped_files"]) == (4, 2)
    # re-running with the output inside the input folder must not read the old output back in
    meta = prepare(str(root), str(root / "data"), tokenizer="byte", val_fraction=0.1, quiet=True)
    meta = prepare(str(root), str(root / "data"), tokenizer="byte", val_fraction=0.1, quiet=True)
    assert (meta["files"], meta["skipped_files"]) == (4, 2)
    np.testing.assert_array_equal(np.concatenate([read_bin(root / "data", "train"),
                                                  read_bin(root / "data", "val")]), expected[1:])


def test_stdlib_subset(tmp_path):
    files = _stdlib_files()
    root = sysconfig.get_paths()["stdlib"]
    rels = [os.path.relpath(p, root).split(os.sep) for p in files]
    assert rels == sorted(rels) and len(files) > 300
    assert all(p.endswith(".py") for p in files)
    banned = {"site-packages", "test", "tests", "idle_test"}
    assert not any(banned & set(r[:-1]) for r in rels)
    assert ["os.py"] in rels and ["json", "decoder.py"] in rels

    out = str(tmp_path / "std")
    meta = prepare("stdlib", out, tokenizer="byte", quiet=True, max_files=3)
    texts = [open(p, encoding="utf-8").read() for p in files[:3]]
    texts = [t for t in texts if t]
    expected = []
    for text in texts:
        expected += [256] + list(text.encode())
    expected = expected[1:]  # eot between files, not before the first
    stream = np.concatenate([read_bin(out, "train"), read_bin(out, "val")])
    np.testing.assert_array_equal(stream, expected)
    assert meta["source"] == "stdlib" and meta["kind"] == "stream"


@pytest.mark.parametrize("name", ["byte", "gpt2"])
def test_jsonl_documents(tmp_path, name):
    texts = [f"document number {i}: {'x' * i} 世界" for i in range(20)]
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    out = str(tmp_path / "d")
    meta = prepare(src, out, tokenizer=name, val_fraction=0.2, seed=3, quiet=True)
    tok = get_tokenizer(name)
    train, val = read_docs(out, "train"), read_docs(out, "val")
    assert (meta["kind"], meta["train_docs"], meta["val_docs"]) == ("documents", 16, 4)
    decoded = []
    for doc in train + val:
        assert doc[-1] == tok.eot_id and tok.eot_id not in doc[:-1]
        decoded.append(tok.decode(doc[:-1]))
    assert sorted(decoded) == sorted(texts)  # every document exactly once across the splits
    # the split is a shuffle, reproducible from the seed
    again = prepare(src, str(tmp_path / "d2"), tokenizer=name, val_fraction=0.2, seed=3, quiet=True)
    assert again["train_tokens"] == meta["train_tokens"]
    np.testing.assert_array_equal(read_bin(out, "val"), read_bin(tmp_path / "d2", "val"))
    prepare(src, str(tmp_path / "d3"), tokenizer=name, val_fraction=0.2, seed=4, quiet=True)
    assert [tok.decode(d) for d in read_docs(tmp_path / "d3", "train")] != [tok.decode(d) for d in train]


def test_jsonl_two_docs_gets_one_val_doc(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}, {"text": "two"}])
    meta = prepare(src, str(tmp_path / "out"), tokenizer="byte", val_fraction=0.1, quiet=True)
    assert (meta["train_docs"], meta["val_docs"]) == (1, 1)


def test_jsonl_sft(tmp_path):
    rows = [{"prompt": f"Q{i}: what is {i}+{i}?\nA:", "completion": f" {2 * i}"} for i in range(10)]
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    out = str(tmp_path / "sft")
    meta = prepare(src, out, tokenizer="gpt2", val_fraction=0.3, quiet=True)
    tok = get_tokenizer("gpt2")
    assert (meta["kind"], meta["train_docs"], meta["val_docs"]) == ("sft", 7, 3)
    seen = []
    for split in ("train", "val"):
        lens = np.load(os.path.join(out, f"{split}_prompt_lens.npy"))
        docs = read_docs(out, split)
        assert lens.dtype == np.int32 and len(lens) == len(docs)
        for doc, n in zip(docs, lens):
            prompt = tok.decode(doc[:n])
            row = next(r for r in rows if r["prompt"] == prompt)
            np.testing.assert_array_equal(
                doc, tok.encode(row["prompt"]) + tok.encode(row["completion"]) + [tok.eot_id])
            seen.append(prompt)
    assert sorted(seen) == sorted(r["prompt"] for r in rows)


def test_jsonl_classify_stratified(tmp_path):
    counts = {"pos": 20, "neg": 10, "rare": 1}
    rows = [{"text": f"{label} example {i}", "label": label} for label, n in counts.items() for i in range(n)]
    src = write_jsonl(tmp_path / "cls.jsonl", rows)
    out = str(tmp_path / "cls")
    meta = prepare(src, out, tokenizer="byte", val_fraction=0.2, quiet=True)
    assert meta["kind"] == "classify" and meta["labels"] == ["neg", "pos", "rare"]
    tok = get_tokenizer("byte")
    per_split = {}
    for split in ("train", "val"):
        labels = np.load(os.path.join(out, f"{split}_labels.npy"))
        docs = read_docs(out, split)
        assert labels.dtype == np.int32 and len(labels) == len(docs)
        for doc, lab in zip(docs, labels):  # each text kept its own label
            assert tok.decode(doc[:-1]).split()[0] == meta["labels"][lab]
        per_split[split] = Counter(meta["labels"][i] for i in labels)
    assert per_split["train"] == {"pos": 16, "neg": 8, "rare": 1}  # every label in train
    assert per_split["val"] == {"pos": 4, "neg": 2}  # each label ~20% of its own examples
    assert (meta["train_docs"], meta["val_docs"]) == (25, 6)
    # classes are interleaved, not stored one after another
    train_labels = np.load(os.path.join(out, "train_labels.npy"))
    assert np.count_nonzero(np.diff(train_labels)) > 3


def test_jsonl_classify_int_labels_keep_their_value_as_index(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 12} for i in range(48)]
    out = str(tmp_path / "cls")
    meta = prepare(write_jsonl(tmp_path / "c.jsonl", rows), out, tokenizer="byte", quiet=True)
    assert meta["labels"] == [str(i) for i in range(12)]
    labels = np.load(os.path.join(out, "train_labels.npy"))
    for doc, lab in zip(read_docs(out, "train"), labels):
        assert int(get_tokenizer("byte").decode(doc[:-1])[1:]) % 12 == lab


def test_jsonl_classify_tiny_classes_still_get_a_val_example(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 3} for i in range(6)]  # 2 per label: 0.1 rounds to 0
    meta = prepare(write_jsonl(tmp_path / "c.jsonl", rows), str(tmp_path / "o"), tokenizer="byte",
                   quiet=True)
    assert (meta["train_docs"], meta["val_docs"]) == (5, 1)


def test_jsonl_classify_singleton_label_stays_in_train(tmp_path):
    rows = [{"text": "a1", "label": "a"}, {"text": "a2", "label": "a"}, {"text": "a3", "label": "a"},
            {"text": "b1", "label": "b"}]  # at val_fraction 0.5 "b" would round to all-val
    out = str(tmp_path / "o")
    meta = prepare(write_jsonl(tmp_path / "c.jsonl", rows), out, tokenizer="byte", val_fraction=0.5, quiet=True)
    train = sorted(np.load(os.path.join(out, "train_labels.npy")).tolist())
    val = sorted(np.load(os.path.join(out, "val_labels.npy")).tolist())
    assert meta["labels"] == ["a", "b"] and train == [0, 1] and val == [0, 0]


BAD_JSONL = {
    "invalid json": ([{"text": "a"}, {"text": "b"}, '{"text": "c"'], "line 3: invalid JSON"),
    "missing field": ([{"text": "a", "label": 1}, {"text": "b"}], "line 2: missing field 'label'"),
    "missing completion": ([{"prompt": "a", "completion": "b"}, {"prompt": "c"}], "line 2: missing field 'completion'"),
    "wrong type": ([{"text": "a"}, {"text": 5}], "line 2: field 'text' must be a string"),
    "bool label": ([{"text": "a", "label": "x"}, {"text": "b", "label": True}], "line 2: field 'label'"),
    "float label": ([{"text": "a", "label": 1.5}], "line 1: field 'label'"),
    "mixed kinds": ([{"text": "a"}, {"text": "b"}, {"text": "c", "label": 1}], "line 3: a classify record in a documents file"),
    "sft then text": ([{"prompt": "a", "completion": "b"}, {"text": "c"}], "line 2: missing field 'prompt'"),
    "not an object": ([{"text": "a"}, "[1, 2]"], "line 2: expected a JSON object"),
    "unknown keys": ([{"body": "a"}], "line 1: expected keys"),
    "no records": (["", "   "], "no records"),
    "all empty": ([{"text": ""}, {"text": ""}], "no text"),
    "single doc": ([{"text": "only one"}], "too few records"),
    "singleton labels": ([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}], "too few records"),
}


@pytest.mark.parametrize("case", list(BAD_JSONL))
def test_malformed_jsonl_writes_nothing(tmp_path, case):
    rows, message = BAD_JSONL[case]
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError, match=message):
        prepare(src, str(tmp_path / "out"), tokenizer="byte", quiet=True)
    assert os.listdir(tmp_path) == ["bad.jsonl"]


def test_bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(b"\x00\x01\x02")
    (tmp_path / "latin.txt").write_bytes("é".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("hello there")
    cases = [
        (dict(input=str(tmp_path / "empty.txt")), "no text"),
        (dict(input=str(tmp_path / "bin")), "no UTF-8 text"),
        (dict(input=str(tmp_path / "latin.txt")), "not a UTF-8 text file"),
        (dict(input=str(tmp_path / "missing.txt")), "does not exist"),
        (dict(input=str(tmp_path / "ok.txt"), val_fraction=0.0), "val-fraction"),
        (dict(input=str(tmp_path / "ok.txt"), val_fraction=0.6), "val-fraction"),
        (dict(input=str(tmp_path / "ok.txt"), val_fraction=float("nan")), "val-fraction"),
        (dict(input=str(tmp_path / "ok.txt"), tokenizer="llama"), "gpt2, byte"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            prepare(out_dir=str(tmp_path / "out"), quiet=True, **{"tokenizer": "byte", **kwargs})
        assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="not a folder"):
        prepare(str(tmp_path / "ok.txt"), str(tmp_path / "ok.txt"), tokenizer="byte", quiet=True)
    assert (tmp_path / "ok.txt").read_text() == "hello there"


def test_reprepare_replaces_only_our_files_and_only_on_success(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "input.txt").write_text("some text that lives inside the data folder " * 5)
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(10)]
    prepare(write_jsonl(tmp_path / "c.jsonl", rows), str(out), tokenizer="byte", quiet=True)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    assert "train_labels.npy" in before

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, "{oops"])
    with pytest.raises(UserError):
        prepare(bad, str(out), tokenizer="byte", quiet=True)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before

    meta = prepare(str(out / "input.txt"), str(out), tokenizer="byte", quiet=True)
    assert sorted(os.listdir(out)) == ["input.txt", "meta.json", "train.bin", "val.bin"]
    assert meta["kind"] == "stream" and load_meta(str(out))["kind"] == "stream"
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "c.jsonl", "data"]


def test_load_meta_validates(tmp_path):
    with pytest.raises(UserError, match="no prepared data in .*jaxgpt prepare --input"):
        load_meta(str(tmp_path / "nowhere"))
    (tmp_path / "t.txt").write_text("hello world, hello data " * 10)
    out = str(tmp_path / "d")
    prepare(str(tmp_path / "t.txt"), out, tokenizer="byte", quiet=True)
    with open(os.path.join(out, "train.bin"), "ab") as f:
        f.write(b"\x01")  # half a uint16
    with pytest.raises(UserError, match="corrupt"):
        load_meta(out)
    with open(os.path.join(out, "train.bin"), "ab") as f:
        f.write(b"\x01")  # a whole extra token: size now disagrees with meta.json
    with pytest.raises(UserError, match="corrupt.*meta.json says"):
        load_meta(out)
    with open(os.path.join(out, "meta.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(UserError, match="corrupt"):
        load_meta(out)


def test_load_meta_nanogpt_folders(tmp_path):
    d = tmp_path / "shakespeare"
    d.mkdir()
    (np.arange(100, dtype=np.uint16) % 65).tofile(d / "train.bin")  # ids below meta.pkl's 65 below
    np.arange(10, dtype=np.uint16).tofile(d / "val.bin")
    meta = load_meta(str(d))
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("gpt2", 50257, "uint16")
    assert (meta["train_tokens"], meta["val_tokens"], meta["kind"]) == (100, 10, "stream")

    with open(d / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 65, "itos": {0: "a"}, "stoi": {"a": 0}}, f)
    meta = load_meta(str(d))
    assert (meta["tokenizer"], meta["vocab_size"]) == (None, 65)

    class Hostile:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "pwned"),))

    with open(d / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": Hostile()}, f)
    with pytest.raises(UserError, match="corrupt"):
        load_meta(str(d))
    assert not (tmp_path / "pwned").exists()


def test_cli(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("the cli path " * 20)
    out = str(tmp_path / "d")
    assert main(["prepare", "--input", str(tmp_path / "t.txt"), "--out", out, "--tokenizer", "byte",
                 "--val-fraction", "0.2"]) == 0
    assert load_meta(out)["val_tokens"] == round(0.2 * 20 * len("the cli path "))
    assert "train/val" in capsys.readouterr().out
    for argv in (["--input", str(tmp_path / "missing"), "--out", out],
                 ["--input", str(tmp_path / "t.txt"), "--out", out, "--val-fraction", "0.9"],
                 ["--input", str(tmp_path / "t.txt"), "--out", out, "--tokenizer", "nope"],
                 ["--out", out]):
        assert main(["prepare", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert main(["prepare", "--input", str(tmp_path / "t.txt"), "--out", str(tmp_path / "q"),
                 "--tokenizer", "byte", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
