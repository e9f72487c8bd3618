"""Flags from run-config dataclasses: one --flag per field, its help and default taken from the field
(``nanoseek.train.loop.opt``), so an option is documented once, where the library defines it.

    p = sub.add_parser("pretrain")
    add_config_args(p, PretrainConfig, skip=("train",))     # --out, --data, --preset, ...
    add_config_args(p, TrainConfig)                         # --steps, --lr, --bf16/--no-bf16, ...
    cfg = config_from_args(PretrainConfig, args, train=config_from_args(TrainConfig, args))
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from ..device import DTYPES, inference_dtype, resolve_device
from ..inference import Engine


def add_config_args(parser, cls, skip: tuple[str, ...] = (), defaults=None) -> None:
    """One --flag per dataclass field, help text and defaults taken from the field (or from the
    instance `defaults`, for a command whose defaults differ, e.g. SFT's shorter schedule)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        flag, typ = "--" + f.name.replace("_", "-"), hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        if defaults is not None:
            default = getattr(defaults, f.name)
        shown = f" (default: {default})" if default is not None else ""
        kw = {"help": f.metadata["help"] + shown, "dest": f.name, "default": default,
              **({"required": True} if f.metadata.get("required") else {})}
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        base = next((t for t in typing.get_args(typ) if t is not type(None)), typ)  # X | None -> X
        if f.metadata.get("nargs"):
            kw["nargs"] = f.metadata["nargs"]
        parser.add_argument(flag, type=base, choices=f.metadata.get("choices"), **kw)


def config_from_args(cls, args, **overrides):
    """Build a config dataclass from parsed args (fields the parser lacks keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw.update(overrides)
    return cls(**kw)


def add_inference_flags(p) -> None:
    """--device, --dtype and --quantize: where and how an inference command holds the model."""
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="compute dtype (auto: bf16 on CUDA, the checkpoint's own on a CPU)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="quantize the weights as the shards load (peak memory: the quantized model + one tensor)")
    p.add_argument("--group-size", type=int, default=128,
                   help="--quantize int4: inputs per scale group (32, 64, 128, 256; every quantized matrix's "
                        "inputs must divide into it, e.g. 64 for DeepSeek-V2-Lite's 10,944-wide FFN)")


def load_engine(args, **kw) -> Engine:
    """The Engine an inference command's --model/--device/--dtype/--quantize ask for."""
    device = resolve_device(args.device)
    return Engine.from_pretrained(args.model, dtype=inference_dtype(device, args.dtype), device=device,
                                  quantize=args.quantize, group_size=args.group_size, **kw)


def add_speculative_flag(p) -> None:
    p.add_argument("--speculative", choices=["auto", "mtp", "off"], default="auto",
                   help="mtp: the MTP module drafts a token that the model verifies (same output when greedy); "
                        "auto (default): mtp when the checkpoint has an MTP module. Measured on a CPU with "
                        "DeepSeek-V2-Lite's shapes (bench_real_scale.py, 2 threads): a verify step costs 1.45-1.52x "
                        "a plain one and the draft 0.1x, so at DeepSeek-V3's 85-90%% acceptance decoding is "
                        "1.15-1.23x faster; off: one token per forward")


def speculative_mode(args, engine: Engine) -> str | None:
    """--speculative as the engine takes it: 'mtp' or None (auto: 'mtp' when the model has an MTP module)."""
    if args.speculative == "auto":
        return "mtp" if engine.model.mtp_layers else None
    return None if args.speculative == "off" else args.speculative

