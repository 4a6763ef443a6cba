"""`jaxgpt convert`: Hugging Face GPT-2 folder <-> jaxgpt checkpoint (see `jaxgpt.hf`)."""

from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert between Hugging Face GPT-2 folders and jaxgpt checkpoints",
        description="Import an HF GPT-2 folder (config.json + model.safetensors) as a jaxgpt "
                    "checkpoint, or export a jaxgpt checkpoint for transformers' GPT2LMHeadModel.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="HF_DIR", help="HF GPT-2 folder to import")
    src.add_argument("--to-hf", metavar="CKPT_DIR", help="jaxgpt checkpoint folder to export")
    p.add_argument("--out", required=True, help="new (or empty) output folder; never overwritten")
    p.add_argument("--step", type=int, default=None,
                   help="with --to-hf: checkpoint step (default: best, else latest)")
    p.set_defaults(func=run)


def run(args) -> int:
    from jaxgpt import hf
    from jaxgpt.errors import UserError

    if args.step is not None and not args.to_hf:
        raise UserError("--step only applies to --to-hf")
    if args.from_hf:
        cfg, notes = hf.convert_from_hf(args.from_hf, args.out)
        for n in notes:
            print(f"warning: {n}", file=sys.stderr)
        src, dst = args.from_hf, args.out
    else:
        cfg = hf.convert_to_hf(args.to_hf, args.out, args.step)
        src, dst = args.to_hf, args.out
    m = cfg.model
    print(f"converted {src} -> {dst} (GPT-2: {m.n_layer} layers, {m.n_head} heads, n_embd {m.n_embd}, "
          f"vocab {m.vocab_size}, context {m.block_size})")
    return 0
