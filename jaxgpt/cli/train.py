"""`jaxgpt train [--config configs/NAME.py] [key=value ...]`"""

from jaxgpt.config import build_config, valid_keys


def add_parser(sub):
    p = sub.add_parser("train", help="train a GPT (no arguments: the embedded default job)",
                       description="Train a GPT. Keys: " + " ".join(valid_keys()))
    p.add_argument("--config", default=None, help="preset file (configs/NAME.py) or preset name")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=run)


def run(args) -> int:
    """Exit status: 0 done, 2 bad input (one line), 3 nan_policy stopped the run, 75 stopped by
    SIGTERM after saving, 130 stopped by Ctrl-C (see jaxgpt/train/faults.py)."""
    import sys

    from jaxgpt.train.faults import NonFiniteStop
    from jaxgpt.train.loop import run_training

    cfg = build_config(args.config, args.overrides)
    try:
        run_training(cfg)
    except KeyboardInterrupt as e:  # faults.Interrupted carries 75 (SIGTERM) or 130 (Ctrl-C)
        return getattr(e, "exit_code", 130)
    except NonFiniteStop as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0
