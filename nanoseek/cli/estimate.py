"""`nanoseek estimate`: what hardware does a DeepSeek model need? Answered from its config alone.

    nanoseek estimate --preset deepseek-v3 --context 32768
    nanoseek estimate --preset r1-distill-qwen-7b          # every published DeepSeek shape is a preset
    nanoseek estimate --preset deepseek-vl-7b                # DeepSeek-VL: towers + language model
    nanoseek estimate --model path/to/checkpoint
    nanoseek estimate --preset deepseek-v2-lite --world 8 --ep 8 --seq-len 4096   # per-rank training memory

The work: nanoseek.estimate.report and parallel_report.
"""

from __future__ import annotations

import argparse

from ..config import PRESETS, ModelConfig
from ..estimate import parallel_report, report, vl_report
from ..vision.vl import VL_PRESETS, vl_preset


def add_parser(sub) -> None:
    p = sub.add_parser("estimate", help="parameters, memory and KV-cache size of a model, from its config")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="deepseek-v3", choices=sorted([*PRESETS, *VL_PRESETS]), metavar="PRESET",
                     help=f"a named config: {', '.join([*PRESETS, *VL_PRESETS])}")
    src.add_argument("--model", default=None, help="a checkpoint folder (only its config.json is read)")
    p.add_argument("--context", type=int, default=4096, help="tokens of context for the KV-cache total")
    p.add_argument("--batch", type=int, default=1, help="sequences for the KV-cache total")
    p.add_argument("--world", type=int, default=None,
                   help="also print per-rank training memory (weights, grads, AdamW, activations) on N ranks")
    p.add_argument("--ep", type=int, default=1, help="with --world: routed experts split over this many ranks")
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                   help="with --world: only the sharded (--fsdp) or replicated (--no-fsdp) layouts (default: both)")
    p.add_argument("--seq-len", type=int, default=4096, help="with --world: tokens per sequence for activations")
    p.add_argument("--micro-batch", type=int, default=1, help="with --world: sequences per rank per micro-batch")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="with --world: count activations as recomputed per block")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.preset in VL_PRESETS and not args.model:
        print(vl_report(vl_preset(args.preset), args.context, args.batch))
        return 0
    if args.model:
        import json
        from pathlib import Path
        from ..vision.vl import VL_TYPES, VLConfig
        d = json.loads((Path(args.model) / "config.json").read_text())
        if d.get("model_type") in VL_TYPES:
            print(vl_report(VLConfig.from_hf(d), args.context, args.batch))
            return 0
    cfg = ModelConfig.from_hf(args.model) if args.model else ModelConfig.preset(args.preset)
    print(report(cfg, args.context, args.batch))
    if args.world:
        print(parallel_report(cfg, args.world, args.ep, args.fsdp, args.micro_batch, args.seq_len,
                              args.activation_checkpointing))
    return 0
