"""`jaxgpt train [--config configs/NAME.py] [key=value ...]`"""

from jaxgpt.config import build_config, valid_keys


def add_parser(sub):
    p = sub.add_parser("train", help="train a GPT (no arguments: the embedded default job)",
                       description="Train a GPT. Keys: " + " ".join(valid_keys()))
    p.add_argument("--config", default=None, help="preset file (configs/NAME.py) or preset name")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=run)


def run(args) -> int:
    from jaxgpt.train.loop import run_training

    cfg = build_config(args.config, args.overrides)
    try:
        run_training(cfg)
    except KeyboardInterrupt:
        return 130
    return 0
