"""`jaxgpt eval --ckpt DIR [--data DATA_DIR] [--step N] [--steps K] [--json]`"""

import json

from jaxgpt.errors import UserError


def add_parser(sub):
    p = sub.add_parser("eval", help="evaluate a checkpoint (config and tokenizer come from it)")
    p.add_argument("--ckpt", required=True, help="run folder holding the checkpoints")
    p.add_argument("--data", default=None, help="data folder (default: the one used for training)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: best, else latest)")
    p.add_argument("--steps", type=int, default=None, help="eval batches per split (default: eval_steps)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None,
                   help="compute dtype (default: the run's; auto = bfloat16 on GPU/TPU, float32 on CPU)")
    # --- int8 quantization (jaxgpt/quant.py; choices = quant.MODES, not imported: jax is slow to load)
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="evaluate the int8 weight-only quantized model (the checkpoint is unchanged)")
    # --- end int8 quantization
    p.set_defaults(func=run)


def run(args) -> int:
    from jaxgpt.evaluate import evaluate_checkpoint

    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    r = evaluate_checkpoint(args.ckpt, data=args.data, step=args.step, steps=args.steps, dtype=args.dtype,
                            quantize=args.quantize)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"checkpoint {args.ckpt} step {r['step']}")
    print(f"train loss {r['train_loss']:.4f} | val loss {r['val_loss']:.4f} | val ppl {r['val_ppl']:.2f}")
    if "val_acc" in r:
        print(f"train acc {r['train_acc']:.4f} | val acc {r['val_acc']:.4f}")
        labels = r["labels"]
        w = max(len(str(x)) for x in labels + ["true\\pred"]) + 1
        print("confusion matrix (rows: true label, columns: predicted)")
        print("true\\pred".ljust(w) + "".join(str(x).rjust(w) for x in labels))
        for lab, row in zip(labels, r["confusion"]):
            print(str(lab).ljust(w) + "".join(str(v).rjust(w) for v in row))
    return 0
