"""`jaxgpt` command line: argument parsing plus one call per subcommand.

Each subcommand lives in `jaxgpt/cli/<name>.py` with `add_parser(subparsers)` and `run(args)`.
Bad input raises `UserError`, printed here as one line with exit status 2 (never a traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from jaxgpt import compile_cache
from jaxgpt.errors import UserError

COMMANDS = ("prepare", "train", "eval", "generate", "convert", "classify")
COMPILING = ("train", "eval", "generate", "classify")  # the commands that compile JAX programs


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints usage; keep it to one line
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxgpt", description="GPT in JAX: prepare data, train, eval, generate.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"jaxgpt.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"jaxgpt.cli.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        if args.command in COMPILING:
            compile_cache.enable()  # later runs load their programs instead of compiling them
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
