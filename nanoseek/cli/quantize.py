"""`nanoseek quantize`: convert a checkpoint to int8 / int4 / FP8, or back to bf16, shard by shard.

    nanoseek quantize --model runs/sft --to int8 --out runs/sft-int8
    nanoseek quantize --model runs/sft --to int4 --group-size 64 --out runs/sft-int4
    nanoseek quantize --model DeepSeek-V3 --to bf16 --out DeepSeek-V3-bf16     # FP8 -> bf16

The work: nanoseek.quant.convert.convert_checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..quant.convert import REPORT, TARGETS, convert_checkpoint, summarize


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="convert a checkpoint to int8 / int4 / FP8, or back to bf16")
    p.add_argument("--model", required=True, help="source checkpoint directory (float, FP8, int8 or int4)")
    p.add_argument("--to", "--format", dest="to", required=True, choices=TARGETS, help="target format")
    p.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
    p.add_argument("--group-size", type=int, default=128, help="int4: inputs per scale group (32, 64, 128, 256)")
    p.add_argument("--keep", nargs="*", default=None, metavar="NAME",
                   help="module name components left high-precision (default: embed_tokens gate kv_b_proj "
                        "for int8/int4; embed_tokens gate lm_head shared_head for fp8)")
    p.add_argument("--keep-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="dtype of the tensors left high-precision (int8/int4)")
    p.set_defaults(func=run)


def run(args) -> int:
    report = convert_checkpoint(args.model, args.out, args.to, args.group_size, args.keep,
                                getattr(torch, args.keep_dtype))
    print(summarize(report))
    print(f"wrote {args.out} ({args.to}); per-tensor errors in {Path(args.out) / REPORT}")
    return 0
