"""`nanoseek estimate`: what hardware does a DeepSeek model need? Answered from its config alone.

    nanoseek estimate --preset deepseek-v3 --context 32768
    nanoseek estimate --preset r1-distill-qwen-7b          # every published DeepSeek shape is a preset
    nanoseek estimate --model path/to/checkpoint

The work: nanoseek.estimate.report.
"""

from __future__ import annotations

from ..config import PRESETS, ModelConfig
from ..estimate import report


def add_parser(sub) -> None:
    p = sub.add_parser("estimate", help="parameters, memory and KV-cache size of a model, from its config")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="deepseek-v3", choices=sorted(PRESETS), metavar="PRESET",
                     help=f"a named config: {', '.join(PRESETS)}")
    src.add_argument("--model", default=None, help="a checkpoint folder (only its config.json is read)")
    p.add_argument("--context", type=int, default=4096, help="tokens of context for the KV-cache total")
    p.add_argument("--batch", type=int, default=1, help="sequences for the KV-cache total")
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = ModelConfig.from_hf(args.model) if args.model else ModelConfig.preset(args.preset)
    print(report(cfg, args.context, args.batch))
    return 0
