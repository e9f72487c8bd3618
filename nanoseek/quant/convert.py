"""Quantized checkpoints: offline conversion shard by shard, and loading with weights kept quantized.

    nanoseek quantize --model runs/sft --to int8 --out runs/sft-int8
    nanoseek quantize --model runs/sft --to int4 --group-size 64 --out runs/sft-int4
    nanoseek quantize --model DeepSeek-V3 --to bf16 --out DeepSeek-V3-bf16     # FP8 -> bf16
    nanoseek quantize --model DeepSeek-V3-bf16 --to fp8 --out DeepSeek-V3-fp8  # and back

Conversion reads one source shard at a time and writes the matching output shard (peak memory: a
shard), so it runs on a CPU for any model size. Every weight of a linear layer and every routed
expert is converted (no calibration data, so no expert is skipped); names matching `keep` (default
the format's ``default_keep``, formats.py: embeddings, the router, kv_b_proj for int8/int4;
embeddings, router and output head for FP8, as DeepSeek-V3 ships) and all norms stay high-precision, written in
`keep_dtype` (default bf16, DeepSeek's own). A source that is itself quantized (FP8, int8, int4) is
dequantized first, so any format converts to any other. The output is written atomically, with the
format in config.json's ``quantization_config``, the other files of the source (tokenizer...)
copied, and ``quantization_report.json``: each converted tensor's relative and max error.

Loading a converted checkpoint is ``nanoseek.hf.load_pretrained``'s job (int8/int4 stay quantized).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..config import ModelConfig
from ..hf.fsutil import atomic_directory
from ..hf.io import (CheckpointError, by_file, checkpoint_files, dequantized, is_stored_quantized, open_safetensors,
                     packed_format, read_tensor, stored_format, stored_key, v4_files, write_index)
from ..hf.keys import companion_keys, has_mtp_layers, mtp_prefixes, natural_key, quantized_keys
from ..v4 import keeps_fp32
from .formats import FORMATS, error_stats

TARGETS = (*FORMATS, "bf16")
REPORT = "quantization_report.json"


# ----------------------------------------------------------------------------- convert

def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, to: str, group_size: int = 128,
                       keep: list[str] | None = None, keep_dtype: torch.dtype = torch.bfloat16,
                       progress: bool = True) -> dict[str, dict[str, float]]:
    """Convert the checkpoint at `src` to format `to` (int8, int4, fp8 or bf16) into `out`.

    Returns the per-tensor error report {key: {rel_error, max_abs_error}} (also written to
    out/quantization_report.json), measured against the source's own (dequantized) values.
    Longer than most functions on purpose: the shard loop reads top to bottom (read, dequantize,
    convert or keep, write), and split up it would hand a dozen locals from piece to piece.
    """
    src, out = Path(src), Path(out)
    if to not in TARGETS:
        raise ValueError(f"--to {to!r}: expected one of {', '.join(TARGETS)}")
    fmt = FORMATS.get(to)  # None: bf16
    if fmt is not None and fmt.group_sizes and group_size not in fmt.group_sizes:
        raise ValueError(f"--group-size {group_size}: the {to} kernels take {fmt.group_sizes}")
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: checkpoint directory not found")
    if src.resolve() == out.resolve():
        raise ValueError(f"--out {out} is the source checkpoint; write the conversion elsewhere")
    cfg = ModelConfig.from_hf(src)
    src_fmt = stored_format(cfg, src)
    files = checkpoint_files(src)
    if cfg.attention == "v4":  # read and written in DeepSeek's spelling, matched under module names
        files = v4_files(cfg, files)
    keep = (list(fmt.default_keep) if fmt else []) if keep is None else list(keep)
    targets = quantized_keys(cfg, keep) if fmt else set()
    companions = {c for key in files for c in companion_keys(key, src_fmt.companions) if c in files} \
        if src_fmt else set()
    if not has_mtp_layers(cfg, files):  # saved without MTP layers
        targets = {k for k in targets if not k.startswith(mtp_prefixes(cfg))}
    missing = sorted(targets - files.keys(), key=natural_key)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{src}: the config implies tensor(s) {', '.join(missing[:3])}{more}, "
                              "which the checkpoint does not have")
    shards = by_file(files, skip=companions)
    report: dict[str, dict[str, float]] = {}
    weight_map: dict[str, str] = {}
    bar = tqdm(total=len(files) - len(companions), desc=f"quantize -> {to}", unit="tensor", disable=not progress)
    with atomic_directory(out, drop=("model*.safetensors", "model.safetensors.index.json", REPORT)) as tmp:
        for file, keys in sorted(shards.items()):
            shard: dict[str, torch.Tensor] = {}
            with open_safetensors(file) as f:
                for key in sorted(keys, key=natural_key):
                    t, name = read_tensor(f, file, stored_key(files, key)), stored_key(files, key)
                    stored = packed_format(cfg, t) or src_fmt  # V4's FP8 checkpoints hold FP4 experts too
                    was_quantized = stored is not None and is_stored_quantized(t) and not key.endswith("tid2eid")
                    if was_quantized:
                        t = dequantized(files, file, key, t, stored)
                    if key in targets:
                        if t.dim() != 2:
                            raise CheckpointError(f"{file}: {key} has shape {tuple(t.shape)}; expected a matrix")
                        parts = fmt.quantize(t, group_size, what=key)
                        shard.update({name + suffix: p.contiguous() for suffix, p in parts.items()})
                        report[name] = error_stats(t, fmt.dequantize(parts))
                    elif t.dtype.is_floating_point and not key.endswith("e_score_correction_bias"):
                        # bf16 and fp8 outputs keep high precision in bf16, as DeepSeek ships
                        held = fmt is not None and fmt.in_memory
                        dtype = keep_dtype if held else torch.bfloat16
                        if cfg.attention == "v4" and keeps_fp32(key):  # mHC, sinks, position biases
                            dtype = torch.float32
                        shard[name] = t.to(dtype).contiguous()
                        if was_quantized:
                            report[name] = error_stats(t, shard[name])
                    else:
                        shard[name] = t.contiguous()
                    bar.update()
            save_file(shard, str(tmp / file.name), metadata={"format": "pt"})
            weight_map.update({key: file.name for key in shard})
        bar.close()
        if len(shards) > 1 or (src / "model.safetensors.index.json").exists():  # shards keep their names
            write_index(tmp, weight_map, sum((tmp / name).stat().st_size for name in set(weight_map.values())))
        (tmp / "config.json").write_text(json.dumps(_out_config(src, to, group_size, keep), indent=2))
        (tmp / REPORT).write_text(json.dumps({"format": to, "source_format": src_fmt.name if src_fmt else "float",
                                              "tensors": report}, indent=2))
        for entry in src.iterdir():  # tokenizer, generation config, logs: everything but the weights
            if entry.is_file() and not (entry.name.startswith("model") and ".safetensors" in entry.name) \
                    and entry.name not in ("config.json", REPORT):
                shutil.copy2(entry, tmp / entry.name)
    return report


def _out_config(src: Path, to: str, group_size: int, keep: list[str]) -> dict:
    """The source's config.json (unknown keys kept) with the new format recorded."""
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    fmt = FORMATS.get(to)  # None: bf16
    if fmt is not None:
        config["quantization_config"] = fmt.config(group_size, keep)
    if fmt is not None and fmt.in_memory:  # int8/int4 compute in the source's dtype; an FP8 source in bf16
        if config.get("torch_dtype") not in ("float32", "bfloat16", "float16"):
            config["torch_dtype"] = "bfloat16"
    else:
        config["torch_dtype"] = "bfloat16"
    return config


def summarize(report: dict[str, dict[str, float]], worst: int = 5) -> str:
    """A few lines on a conversion report: tensor count, mean and worst relative errors."""
    if not report:
        return "no tensor changed format"
    errs = sorted(report.items(), key=lambda kv: -kv[1]["rel_error"])
    mean = sum(r["rel_error"] for r in report.values()) / len(report)
    lines = [f"{len(report)} tensors converted, relative error mean {mean:.2e}, worst:"]
    lines += [f"  {r['rel_error']:.2e}  (max abs {r['max_abs_error']:.2e})  {k}" for k, r in errs[:worst]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command
