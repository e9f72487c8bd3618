"""The `nanoseek` command (also `python -m nanoseek`). Subcommands are thin: each lives in the
module that implements it, which exposes ``add_parser(subparsers)`` registering its flags and a
``func(args)`` to run.

    nanoseek estimate --preset deepseek-v3
    nanoseek --help
"""

from __future__ import annotations

import argparse
import importlib
import sys

# One module per subcommand group; each defines add_parser(subparsers).
COMMAND_MODULES = [
    "nanoseek.estimate",
    "nanoseek.smoke",
    "nanoseek.generate",
    "nanoseek.train.pretrain",
    "nanoseek.train.sft",
    "nanoseek.train.evaluate",
    "nanoseek.rl.grpo",
    "nanoseek.rl.distill",
    "nanoseek.demo.run",
    "nanoseek.quant.convert",
    "nanoseek.serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description="The DeepSeek recipe in one PyTorch codebase.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
