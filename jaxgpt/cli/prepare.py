"""`jaxgpt prepare`: tokenize a text file, folder, JSONL file or `stdlib` into a data folder."""

from __future__ import annotations

from jaxgpt.prepare import STDLIB, prepare
from jaxgpt.tokenizer import TOKENIZERS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="tokenize text into train.bin/val.bin (+ meta.json)",
        description="Tokenize INPUT into the data folder OUT. INPUT is a UTF-8 text file, a folder of "
                    "text files (recursive, joined with <|endoftext|>), a .jsonl file of {\"text\"}, "
                    "{\"prompt\",\"completion\"} or {\"text\",\"label\"} records, or the word "
                    f"'{STDLIB}' for this Python's standard library source (the built-in default corpus).")
    p.add_argument("--input", required=True, help=f"text file, folder, .jsonl file, or '{STDLIB}'")
    p.add_argument("--out", required=True, help="data folder to write (created if missing)")
    p.add_argument("--tokenizer", default="gpt2", choices=TOKENIZERS, help="default: gpt2")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share held out for validation, in (0, 0.5] (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed for JSONL documents (default 0)")
    p.add_argument("--quiet", action="store_true", help="no summary line")
    p.set_defaults(func=run)


def run(args) -> int:
    prepare(args.input, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
            seed=args.seed, quiet=args.quiet)
    return 0
