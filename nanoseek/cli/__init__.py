"""The `nanoseek` command (also `python -m nanoseek`): the one layer that parses flags. Each
subcommand is a module here exposing ``add_parser(subparsers)``, which registers its flags and
sets ``func`` to its ``run(args)``; run calls the library. The library never imports this package.

    nanoseek --help
    nanoseek estimate --preset deepseek-v3
    python -m nanoseek pretrain --preset tiny --data arithmetic --steps 600 --out runs/pretrain

    flags.py     --flags generated from the run-config dataclasses (one help text per option)
    estimate.py  smoke.py  generate.py (generate, chat)  pretrain.py  sft.py  eval.py  grpo.py  distill.py
    demo.py  quantize.py  serve.py: one per command
"""

from __future__ import annotations

import argparse
import importlib
import sys

# One module per subcommand, in --help order; each defines add_parser(subparsers).
COMMAND_MODULES = [
    "nanoseek.cli.estimate",
    "nanoseek.cli.smoke",
    "nanoseek.cli.generate",
    "nanoseek.cli.pretrain",
    "nanoseek.cli.sft",
    "nanoseek.cli.vl_sft",
    "nanoseek.cli.eval",
    "nanoseek.cli.grpo",
    "nanoseek.cli.distill",
    "nanoseek.cli.demo",
    "nanoseek.cli.quantize",
    "nanoseek.cli.serve",
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
