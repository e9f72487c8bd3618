"""Quantized checkpoints: offline conversion shard by shard, and loading with weights kept quantized.

    nanoseek quantize --model runs/sft --to int8 --out runs/sft-int8
    nanoseek quantize --model runs/sft --to int4 --group-size 64 --out runs/sft-int4
    nanoseek quantize --model DeepSeek-V3 --to bf16 --out DeepSeek-V3-bf16     # FP8 -> bf16
    nanoseek quantize --model DeepSeek-V3-bf16 --to fp8 --out DeepSeek-V3-fp8  # and back

Conversion reads one source shard at a time and writes the matching output shard (peak memory: a
shard), so it runs on a CPU for any model size. Every weight of a linear layer and every routed
expert is converted (no calibration data, so no expert is skipped); names matching `keep` (default
``modules.DEFAULT_KEEP``: embeddings, the router, kv_b_proj for int8/int4; embeddings, router and
output head for FP8, as DeepSeek-V3 ships) and all norms stay high-precision, written in
`keep_dtype` (default bf16, DeepSeek's own). A source that is itself quantized (FP8, int8, int4) is
dequantized first, so any format converts to any other. The output is written atomically, with the
format in config.json's ``quantization_config``, the other files of the source (tokenizer...)
copied, and ``quantization_report.json``: each converted tensor's relative and max error.

``load_quantized`` is what ``checkpoint.load_pretrained`` calls for an int8/int4 checkpoint: the
model is built on the meta device, its modules swapped for quantized ones (modules.swap_modules),
and the stored codes and scales copied in; weights are never dequantized.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from ..checkpoint import (CheckpointError, _assign, _init_buffers, _natural_key, _open, _target_dtype,
                          checkpoint_files, hf_state_dict_keys)
from ..config import ModelConfig
from ..fsutil import atomic_directory
from ..model import Experts, Transformer
from .formats import COMPANIONS, INT4_GROUP_SIZES, STORED_DTYPE, dequantize_weight, error_stats, quantize_weight, stored_shapes
from .modules import DEFAULT_KEEP, _QuantExperts, _QuantLinear, is_kept, quantization_config, swap_modules

TARGETS = ("int8", "int4", "fp8", "bf16")
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
REPORT = "quantization_report.json"


def quantized_keys(cfg: ModelConfig, keep: list[str]) -> set[str]:
    """The checkpoint keys a quantized format converts: the weight of every nn.Linear and every
    routed expert whose module name `keep` does not match (the MTP layers' copy of the output head
    follows lm_head)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    keys: set[str] = set()
    for name, module in model.named_modules():
        if is_kept(name, keep):
            continue
        if isinstance(module, nn.Linear) and not (name == "lm_head" and cfg.tie_word_embeddings):
            keys.add(f"{name}.weight")
        elif isinstance(module, Experts):
            keys.update(f"{name}.{e}.{p}.weight" for e in range(module.gate_proj.shape[0])
                        for p in ("gate_proj", "up_proj", "down_proj"))
    if "lm_head.weight" in keys:
        n = cfg.num_hidden_layers
        keys.update(f"model.layers.{n + k}.shared_head.head.weight" for k in range(cfg.num_nextn_predict_layers))
    return keys


def _source_format(cfg: ModelConfig, path: Path) -> str | None:
    method = (cfg.quantization_config or {}).get("quant_method")
    if method not in (None, "fp8", "int8", "int4"):
        raise CheckpointError(f"{path / 'config.json'}: quantization_config.quant_method={method!r} is not "
                              "one nanoseek reads (fp8, int8, int4)")
    return method


# ----------------------------------------------------------------------------- convert

def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, to: str, group_size: int = 128,
                       keep: list[str] | None = None, keep_dtype: torch.dtype = torch.bfloat16,
                       progress: bool = True) -> dict[str, dict[str, float]]:
    """Convert the checkpoint at `src` to format `to` (int8, int4, fp8 or bf16) into `out`.

    Returns the per-tensor error report {key: {rel_error, max_abs_error}} (also written to
    out/quantization_report.json), measured against the source's own (dequantized) values.
    """
    src, out = Path(src), Path(out)
    if to not in TARGETS:
        raise ValueError(f"--to {to!r}: expected one of {', '.join(TARGETS)}")
    if to == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"--group-size {group_size}: the int4 kernels take {INT4_GROUP_SIZES}")
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: checkpoint directory not found")
    if src.resolve() == out.resolve():
        raise ValueError(f"--out {out} is the source checkpoint; write the conversion elsewhere")
    cfg = ModelConfig.from_hf(src)
    src_fmt = _source_format(cfg, src)
    files = checkpoint_files(src)
    keep = DEFAULT_KEEP.get(to, []) if keep is None else list(keep)
    targets = quantized_keys(cfg, keep) if to != "bf16" else set()
    src_group = (cfg.quantization_config or {}).get("group_size", 128)

    def read(f, file: Path, key: str) -> tuple[torch.Tensor, bool]:
        """(the source tensor under `key`, dequantized to fp32 if stored quantized; whether it was)."""
        try:
            t = f.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {key} ({e}); the file may be truncated") from None
        if src_fmt is None or t.dtype.is_floating_point and t.dtype != torch.float8_e4m3fn:
            return t, False
        parts = {"": t}
        for suffix in COMPANIONS[src_fmt]:
            if key + suffix not in files:
                raise CheckpointError(f"{file}: {key} is stored {t.dtype} ({src_fmt}) but {key + suffix} is missing")
            with _open(files[key + suffix]) as cf:
                parts[suffix] = cf.get_tensor(key + suffix)
        try:
            return dequantize_weight(src_fmt, parts, torch.float32), True
        except RuntimeError as e:
            raise CheckpointError(f"{file}: {key} and its {src_fmt} scales do not fit together ({e})") from None

    companions = {key + s for key in files for s in COMPANIONS.get(src_fmt or "", ()) if key + s in files}
    n = cfg.num_hidden_layers
    if not any(k.startswith(f"model.layers.{n}.") for k in files):  # saved without MTP layers
        targets = {k for k in targets if not k.startswith(tuple(f"model.layers.{n + i}."
                                                                for i in range(cfg.num_nextn_predict_layers)))}
    missing = sorted(targets - files.keys(), key=_natural_key)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{src}: the config implies tensor(s) {', '.join(missing[:3])}{more}, "
                              "which the checkpoint does not have")
    by_file: dict[Path, list[str]] = {}
    for key, file in files.items():
        if key not in companions:
            by_file.setdefault(file, []).append(key)
    report: dict[str, dict[str, float]] = {}
    weight_map: dict[str, str] = {}
    bar = tqdm(total=len(files) - len(companions), desc=f"quantize -> {to}", unit="tensor", disable=not progress)
    with atomic_directory(out, drop=("model*.safetensors", "model.safetensors.index.json", REPORT)) as tmp:
        for file, keys in sorted(by_file.items()):
            shard: dict[str, torch.Tensor] = {}
            with _open(file) as f:
                for key in sorted(keys, key=_natural_key):
                    t, was_quantized = read(f, file, key)
                    if key in targets:
                        if t.dim() != 2:
                            raise CheckpointError(f"{file}: {key} has shape {tuple(t.shape)}; expected a matrix")
                        parts = quantize_weight(to, t, group_size, what=key)
                        shard.update({key + suffix: p.contiguous() for suffix, p in parts.items()})
                        report[key] = error_stats(t, dequantize_weight(to, parts))
                    elif t.dtype.is_floating_point and not key.endswith("e_score_correction_bias"):
                        shard[key] = t.to(torch.bfloat16 if to in ("bf16", "fp8") else keep_dtype).contiguous()
                        if was_quantized:
                            report[key] = error_stats(t, shard[key])
                    else:
                        shard[key] = t.contiguous()
                    bar.update()
            save_file(shard, str(tmp / file.name), metadata={"format": "pt"})
            weight_map.update({key: file.name for key in shard})
        bar.close()
        if len(by_file) > 1 or (src / "model.safetensors.index.json").exists():  # shards keep their names
            names = set(weight_map.values())
            index = {"metadata": {"total_size": sum((tmp / name).stat().st_size for name in names)},
                     "weight_map": dict(sorted(weight_map.items(), key=lambda kv: _natural_key(kv[0])))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(_out_config(src, to, group_size, keep), indent=2))
        (tmp / REPORT).write_text(json.dumps({"format": to, "source_format": src_fmt or "float",
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
    if to in ("int8", "int4"):
        config["quantization_config"] = quantization_config(to, group_size, keep)
        if config.get("torch_dtype") not in ("float32", "bfloat16", "float16"):
            config["torch_dtype"] = "bfloat16"  # an FP8 source computes in bf16
    else:
        config["torch_dtype"] = "bfloat16"
        if to == "fp8":
            config["quantization_config"] = dict(FP8_CONFIG)
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


# ----------------------------------------------------------------------------- load

def load_quantized(path: str | os.PathLike, cfg: ModelConfig | None = None, dtype: torch.dtype | None = None,
                   device: str | torch.device = "cpu") -> Transformer:
    """Load an int8/int4 checkpoint with its weights kept quantized (``load_pretrained`` calls this).

    dtype: the compute dtype of everything left high-precision and of the activations
    (default: config.json's torch_dtype).
    """
    path = Path(path)
    cfg = ModelConfig.from_hf(path) if cfg is None else cfg
    qc = cfg.quantization_config or {}
    method = qc.get("quant_method")
    if method not in ("int8", "int4"):
        raise CheckpointError(f"{path / 'config.json'}: quantization_config.quant_method={method!r}; "
                              "load_quantized reads int8 and int4 checkpoints")
    keep = list(qc.get("modules_to_not_convert", DEFAULT_KEEP[method]))
    group_size = int(qc.get("group_size", 128))
    files = checkpoint_files(path)
    n = cfg.num_hidden_layers
    if cfg.num_nextn_predict_layers and not any(k.startswith(f"model.layers.{n}.") for k in files):
        cfg = cfg.replace(num_nextn_predict_layers=0)  # load_pretrained's rule: no MTP layers saved, MTP off
    dtype = _target_dtype(cfg, dtype)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = set(hf_state_dict_keys(model))
    targets = quantized_keys(cfg, keep)
    try:
        swap_modules(model, method, group_size, keep)
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    model = model.to_empty(device=device)
    for p in model.parameters():  # quantized modules' codes and bf16 scales are buffers: left alone
        p.data = p.data.to(dtype)
    model.tie_weights()
    _init_buffers(model, device)
    params = dict(model.named_parameters())
    params.update(model.named_buffers())
    # a companion is skipped on its own even when its weight is missing: the error then names the weight
    companions = {key + s for key in files.keys() | targets for s in COMPANIONS[method] if key + s in files}
    experts: dict[tuple[str, int], dict[str, tuple]] = {}
    seen: set[str] = set()
    by_file: dict[Path, list[str]] = {}
    for key, file in files.items():
        if key not in companions:
            by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        with _open(file) as f:
            for key in keys:
                t = _get(f, file, key)
                if key in targets or (key.endswith(".weight") and key + "_scale" in files):
                    seen.update(_load_quantized_weight(model, key, t, file, files, method, group_size,
                                                       targets, experts, qc))
                else:
                    seen.update(_assign(model, params, key, t, file, cfg, False))
    for (name, e), projs in experts.items():
        if len(projs) == 3:
            model.get_submodule(name).set_expert(e, projs["gate_proj"], projs["up_proj"], projs["down_proj"])
    missing = sorted(expected - seen, key=_natural_key)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:5])}{more}")
    return model.eval()


def _get(f, file: Path, key: str) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read tensor {key} ({e}); the file may be truncated") from None


def _load_quantized_weight(model, key, t, file, files, method, group_size, targets, experts, qc) -> list[str]:
    """Check one stored quantized weight against the module that takes it and copy it in."""
    if key not in targets:
        raise CheckpointError(f"{file}: {key} is stored quantized but config.json's quantization_config "
                              f"(modules_to_not_convert={qc.get('modules_to_not_convert')}) keeps it in high "
                              "precision")
    name, _, _ = key.rpartition(".")
    if t.dtype != STORED_DTYPE[method]:
        raise CheckpointError(f"{file}: {key} has dtype {t.dtype}; an {method} checkpoint stores it as "
                              f"{STORED_DTYPE[method]} (config.json quantization_config.quant_method={method})")
    parts = {"": t}
    for suffix in COMPANIONS[method]:
        if key + suffix not in files:
            raise CheckpointError(f"{file}: {key} is {method} but its companion {key + suffix} is missing")
        with _open(files[key + suffix]) as cf:
            parts[suffix] = _get(cf, files[key + suffix], key + suffix)
    layer = name.split(".")
    if layer[-1] == "head" and layer[-2] == "shared_head":
        return [key]  # the MTP layers' copy of lm_head, which the model shares
    if len(layer) > 2 and layer[-3] == "experts":
        module, e, proj = model.get_submodule(".".join(layer[:-2])), int(layer[-2]), layer[-1]
        shape = (module.inter_dim, module.dim) if proj != "down_proj" else (module.dim, module.inter_dim)
    else:
        module = model.get_submodule(name)
        shape = (module.out_features, module.in_features)
    if not isinstance(module, (_QuantLinear, _QuantExperts)):
        raise CheckpointError(f"{file}: {key} is stored {method} but the model holds {name} in high precision")
    for suffix, want in stored_shapes(method, shape, group_size, key).items():
        got = parts[suffix]
        if suffix and not got.dtype.is_floating_point:
            raise CheckpointError(f"{file}: {key + suffix} has dtype {got.dtype}; expected floating point")
        if tuple(got.shape) != want:
            raise CheckpointError(f"{file}: {key + suffix} has shape {tuple(got.shape)}, the config implies {want}"
                                  + (f" (int4 group size {group_size})" if method == "int4" else ""))
    ordered = tuple(parts[s] for s in ("",) + COMPANIONS[method])
    if isinstance(module, _QuantExperts):
        experts.setdefault((".".join(layer[:-2]), e), {})[proj] = ordered
    else:
        module.set_quantized(*ordered)
    return [key]


# ----------------------------------------------------------------------------- command

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
