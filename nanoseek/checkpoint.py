"""Hugging Face DeepSeek checkpoints in and out: config.json + safetensors, FP8 included.

    model = load_pretrained("DeepSeek-V2-Lite", dtype=torch.bfloat16)
    save_pretrained(model, "out/my-model")     # transformers' from_pretrained loads it

Keys are exactly DeepSeek's (``model.layers.N.self_attn.kv_a_proj_with_mqa.weight``,
``model.layers.N.mlp.experts.E.gate_proj.weight``, MTP at layer index ``num_hidden_layers``).
Loading goes shard by shard into a model built on the meta device, so peak memory is the
model plus one shard. FP8 e4m3 weights with 128x128 ``weight_scale_inv`` blocks (DeepSeek-V3/R1)
are dequantized on the fly. Only safetensors is ever read: no pickle.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .fsutil import atomic_directory
from .model import Gate, RotaryEmbedding, Transformer, rope_frequencies

FP8_BLOCK = 128
_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_MTP_SHARED = re.compile(r"^model\.layers\.(\d+)\.(embed_tokens\.weight|shared_head\.head\.weight)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and key."""


# ----------------------------------------------------------------------------- FP8 blocks

def fp8_block_quantize(weight: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """W [M, N] -> (float8_e4m3fn [M, N], weight_scale_inv fp32 [ceil(M/b), ceil(N/b)]).

    Each block x block tile is scaled so its largest magnitude maps to e4m3's max (448);
    scale_inv is what multiplies the FP8 values back, as in DeepSeek-V3's checkpoints.
    """
    M, N = weight.shape
    pm, pn = -M % block, -N % block
    w = torch.nn.functional.pad(weight.float(), (0, pn, 0, pm))
    tiles = w.view((M + pm) // block, block, (N + pn) // block, block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / torch.finfo(torch.float8_e4m3fn).max
    q = (tiles / scale_inv[:, None, :, None]).view(M + pm, N + pn)[:M, :N]
    return q.to(torch.float8_e4m3fn), scale_inv


def fp8_block_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK,
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W = W_fp8 * s for each block x block tile; scale_inv [ceil(M/b), ceil(N/b)] (DeepSeek's layout)."""
    M, N = weight.shape
    s = scale_inv.float().repeat_interleave(block, 0)[:M].repeat_interleave(block, 1)[:, :N]
    return (weight.float() * s).to(dtype)


# ----------------------------------------------------------------------------- save

def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors under DeepSeek checkpoint keys (experts split, MTP shared copies added)."""
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$", name)
        if m:
            for e in range(t.shape[0]):
                out[f"{m[1]}.{e}.{m[2]}.weight"] = t[e]
        elif name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        else:
            out[name] = t
    # DeepSeek-V3 stores the MTP module's (shared) embedding and head inside its layer.
    for k in range(cfg.num_nextn_predict_layers):
        idx = cfg.num_hidden_layers + k
        out[f"model.layers.{idx}.embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
        out[f"model.layers.{idx}.shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    return {k: v.detach().contiguous() for k, v in out.items()}


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or a string like '5GB'")
    return int(float(m[1]) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m[2]])


def save_pretrained(model: Transformer, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                    tensors: dict[str, torch.Tensor] | None = None, config: dict | None = None) -> Path:
    """Write config.json + model.safetensors (or shards + index) into `path`, atomically.

    `tensors`/`config` override what is written (used by quantization); other files already
    in `path` (tokenizer, logs) are kept.
    """
    tensors = hf_state_dict(model) if tensors is None else tensors
    config = dict(model.config.to_hf() if config is None else config)
    some = next(iter(tensors.values()))
    config.setdefault("torch_dtype", str(some.dtype).removeprefix("torch."))
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors, key=_natural_key):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    path = Path(path)
    with atomic_directory(path, drop=("model*.safetensors", "model.safetensors.index.json")) as tmp:
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata=meta)
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=meta)
                for key, t in shard.items():
                    weight_map[key] = fname
                    total += t.numel() * t.element_size()
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return path


def _natural_key(key: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


# ----------------------------------------------------------------------------- load

def checkpoint_files(path: Path) -> dict[str, Path]:
    """key -> safetensors file holding it, from the index or the single file."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = {key: path / fname for key, fname in weight_map.items()}
        for f in set(files.values()):
            if not f.exists():
                raise CheckpointError(f"{index}: lists {f.name}, which is missing")
        return files
    single = path / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                              "(only safetensors checkpoints are read)")
    with _open(single) as f:
        return {key: single for key in f.keys()}


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt headers
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None


def _target_dtype(cfg: ModelConfig, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    name = cfg.torch_dtype or "float32"
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point or dt.itemsize < 2:
        return torch.bfloat16 if dt is not None and dt.itemsize == 1 else torch.float32
    return dt


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    allow_unexpected: bool = False) -> Transformer:
    """Load a DeepSeek-V2/V3 checkpoint directory written by nanoseek, transformers or DeepSeek.

    dtype: compute dtype (default: config's torch_dtype; FP8 checkpoints load as bf16).
    allow_unexpected: skip (with a warning) tensors the model has no place for instead of failing.
    A checkpoint without the MTP layers (as transformers saves DeepSeek models) loads with MTP off.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    cfg = ModelConfig.from_hf(path)
    quant = (cfg.quantization_config or {}).get("quant_method")
    if quant not in (None, "fp8"):
        from .quant import load_quantized  # int8 / int4 weight-only checkpoints
        return load_quantized(path, cfg, dtype=dtype, device=device)
    files = checkpoint_files(path)
    n = cfg.num_hidden_layers
    if cfg.num_nextn_predict_layers and not any(k.startswith(f"model.layers.{n}.") for k in files):
        warnings.warn(f"{path}: no MTP layers (model.layers.{n}.*) in the checkpoint; loading with MTP disabled")
        cfg = cfg.replace(num_nextn_predict_layers=0)
    dtype = _target_dtype(cfg, dtype)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    _init_buffers(model, device)
    _load_tensors(model, files, dtype, allow_unexpected)
    model.eval()
    return model


def _init_buffers(model: Transformer, device) -> None:
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.inv_freq = rope_frequencies(model.config)[0].to(device)
        if isinstance(m, Gate) and m.e_score_correction_bias is not None:
            m.e_score_correction_bias = torch.zeros_like(m.e_score_correction_bias, dtype=torch.float32)


def _load_tensors(model: Transformer, files: dict[str, Path], dtype, allow_unexpected: bool) -> None:
    cfg = model.config
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    expected = set(hf_state_dict_keys(model))
    seen: set[str] = set()
    by_file: dict[Path, list[str]] = {}
    for key, f in files.items():
        by_file.setdefault(f, []).append(key)
    for file, keys in by_file.items():
        with _open(file) as f:
            for key in keys:
                if key.endswith("_scale_inv"):
                    continue  # consumed with its weight
                try:
                    t = f.get_tensor(key)
                    if t.dtype == torch.float8_e4m3fn:
                        scale_key = key + "_scale_inv"
                        if scale_key not in files:
                            raise CheckpointError(f"{file}: {key} is float8 but {scale_key} is missing")
                        with _open(files[scale_key]) as sf:
                            t = fp8_block_dequantize(t, sf.get_tensor(scale_key), dtype=torch.float32)
                except CheckpointError:
                    raise
                except Exception as e:
                    raise CheckpointError(f"{file}: cannot read tensor {key} ({e}); the file may be truncated") \
                        from None
                seen.update(_assign(model, params, key, t, file, cfg, allow_unexpected))
    missing = sorted(expected - seen, key=_natural_key)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{next(iter(files.values())).parent}: missing tensor(s) "
                              f"{', '.join(missing[:5])}{more}")


def hf_state_dict_keys(model: Transformer) -> list[str]:
    keys = []
    cfg = model.config
    for name, t in model.state_dict(keep_vars=True).items():
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$", name)
        if m:
            keys += [f"{m[1]}.{e}.{m[2]}.weight" for e in range(t.shape[0])]
        elif not (name == "lm_head.weight" and cfg.tie_word_embeddings):
            keys.append(name)
    return keys


def _assign(model, params, key, t, file, cfg, allow_unexpected) -> list[str]:
    """Copy t into its place; returns the checkpoint keys it covered."""
    def check_shape(target_shape, what=key):
        if tuple(t.shape) != tuple(target_shape):
            raise CheckpointError(f"{file}: {what} has shape {tuple(t.shape)}, the config implies "
                                  f"{tuple(target_shape)}")

    if not (t.dtype.is_floating_point or key.endswith("e_score_correction_bias")):
        raise CheckpointError(f"{file}: {key} has dtype {t.dtype}; expected a floating-point tensor")
    m = _EXPERT_KEY.match(key)
    if m and f"{m[1]}.{m[3]}" in params:
        target = params[f"{m[1]}.{m[3]}"]
        e = int(m[2])
        if e >= target.shape[0]:
            return _unexpected(key, file, allow_unexpected)
        check_shape(target.shape[1:])
        with torch.no_grad():
            target[e].copy_(t)
        return [key]
    m = _FUSED_EXPERT_KEY.match(key)  # transformers-5 in-memory layout, if ever saved that way
    if m and f"{m[1]}.down_proj" in params:
        with torch.no_grad():
            if m[2] == "down_proj":
                check_shape(params[key].shape)
                params[key].copy_(t)
            else:
                gate, up = params[f"{m[1]}.gate_proj"], params[f"{m[1]}.up_proj"]
                check_shape((gate.shape[0], 2 * gate.shape[1], gate.shape[2]))
                gate.copy_(t[:, :gate.shape[1]])
                up.copy_(t[:, gate.shape[1]:])
        names = ("down_proj",) if m[2] == "down_proj" else ("gate_proj", "up_proj")
        return [f"{m[1]}.{e}.{n}.weight" for n in names for e in range(params[f"{m[1]}.down_proj"].shape[0])]
    if _MTP_SHARED.match(key) and int(_MTP_SHARED.match(key)[1]) >= cfg.num_hidden_layers:
        return []  # copies of the shared embedding / head
    if key not in params:
        return _unexpected(key, file, allow_unexpected)
    check_shape(params[key].shape)
    with torch.no_grad():
        params[key].copy_(t)
    return [key]


def _unexpected(key, file, allow_unexpected):
    if not allow_unexpected:
        raise CheckpointError(f"{file}: unexpected tensor {key} (the config has no place for it; "
                              "pass allow_unexpected=True to skip it)")
    warnings.warn(f"{file}: skipping unexpected tensor {key}")
    return []
