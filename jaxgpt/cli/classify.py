"""`jaxgpt classify --ckpt DIR (--text TEXT ... | --input FILE) [--step N] [--json]`"""

import json

from jaxgpt.errors import UserError


def add_parser(sub):
    p = sub.add_parser(
        "classify", help="label texts with a task=classify checkpoint",
        description="Print the predicted label and the class probabilities of each text. "
                    "Tokenizer and label names come from the checkpoint.")
    p.add_argument("--ckpt", required=True, help="run folder of a task=classify training")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="extend", nargs="+", metavar="TEXT",
                     help="one or more texts (repeatable)")
    src.add_argument("--input", metavar="FILE",
                     help="one text per line, or a .jsonl file of objects with a 'text' field")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: best, else latest)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per text: {text, label, probs: {label: p}}")
    p.set_defaults(func=run)


def run(args) -> int:
    from jaxgpt.classify import Classifier, read_texts

    texts = read_texts(args.input) if args.input is not None else list(args.text)
    if not texts:
        raise UserError("no texts to classify")
    results = Classifier(args.ckpt, args.step).predict(texts)
    for r in results:
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
        else:
            probs = " ".join(f"{name}={p:.4f}" for name, p in r["probs"].items())
            # one line per text, whatever the text holds
            print(f"{r['label']}\t{probs}\t{json.dumps(r['text'], ensure_ascii=False)}")
    return 0
