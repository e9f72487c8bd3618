"""Hugging Face checkpoints in and out, in any stored format: config.json + safetensors.

    model = load_pretrained("DeepSeek-V2-Lite", dtype=torch.bfloat16)
    model = load_pretrained("runs/sft-int8")        # int8 / int4: the weights stay quantized
    save_pretrained(model, "out/my-model")          # transformers' from_pretrained loads it

One loader for every format config.json's ``quantization_config`` may name: none (fp32, bf16,
fp16), DeepSeek's FP8 (e4m3 weights with 128x128 ``weight_scale_inv`` blocks, dequantized on the
fly) and nanoseek's int8 / int4 (the model's modules are first swapped for quantized ones,
``quant.formats.swap_modules``, then the stored codes and scales are copied in: never dequantized).
Keys are mapped by keys.py. Loading goes shard by shard into a model built on the meta device, so
peak memory is the model plus one shard. Saving is atomic (fsutil.py). Only safetensors is ever
read: no pickle.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..layers import RotaryEmbedding, rope_frequencies
from ..model import Gate, Transformer
from ..models import build_model
from ..v4 import Rotary, keeps_fp32
from ..quant.formats import FORMATS, FP4, WeightFormat, swap_modules, weight_format
from ..quant.modules import QuantExperts, QuantLinear
from ..tokenizer import Tokenizer
from .fsutil import atomic_directory
from .keys import (EXPERT_KEY, FUSED_EXPERT_KEY, companion_keys, expert_keys, has_mtp_layers, hf_keys,
                   hf_state_dict, is_computed, is_mtp_shared_copy, natural_key, quantized_keys, v4_stored_names)

FP8 = FORMATS["fp8"]  # what DeepSeek-V3/R1 ship; read whatever the config says


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and key."""


# ----------------------------------------------------------------------------- reading

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
    with open_safetensors(single) as f:
        return {key: single for key in f.keys()}


def open_safetensors(file: Path):
    """safe_open on CPU, with a CheckpointError naming the file if its header is corrupt."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt headers
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None


def read_tensor(f, file: Path, key: str) -> torch.Tensor:
    """f.get_tensor(key), with a CheckpointError naming the file and key if the data is cut short."""
    try:
        return f.get_tensor(key)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read tensor {key} ({e}); the file may be truncated") from None


def stored_format(cfg: ModelConfig, path: Path) -> WeightFormat | None:
    """The format config.json's quantization_config names (None: plain floating point)."""
    method = (cfg.quantization_config or {}).get("quant_method")
    if method is not None and method not in FORMATS:
        raise CheckpointError(f"{path / 'config.json'}: quantization_config.quant_method={method!r} is not "
                              f"one nanoseek reads ({', '.join(sorted(FORMATS))})")
    return FORMATS.get(method)


class RenamedFiles(dict):
    """{key: file} under the model's names, remembering each key's name on disk (DeepSeek-V4's spelling)."""

    def __init__(self, files: dict[str, Path], stored: dict[str, str]):
        super().__init__(files)
        self.stored = stored


def stored_key(files: dict[str, Path], key: str) -> str:
    """The name `key` has in the checkpoint's files."""
    return files.stored.get(key, key) if isinstance(files, RenamedFiles) else key


def read_parts(files: dict[str, Path], file: Path, key: str, t: torch.Tensor, fmt: WeightFormat
               ) -> dict[str, torch.Tensor]:
    """A stored quantized weight `t` with its companions read from their files: {suffix: tensor}."""
    parts = {"": t}
    for suffix, ckey in zip(fmt.companions, companion_keys(key, fmt.companions)):
        if ckey not in files:
            raise CheckpointError(f"{file}: {key} is stored {t.dtype} ({fmt.name}) but its companion {ckey} "
                                  "is missing")
        with open_safetensors(files[ckey]) as cf:
            parts[suffix] = read_tensor(cf, files[ckey], stored_key(files, ckey))
    return parts


def is_stored_quantized(t: torch.Tensor) -> bool:
    """Integer codes or FP8: a tensor that means nothing without its companions."""
    return not t.dtype.is_floating_point or t.dtype == FP8.stored_dtype


def packed_format(cfg: ModelConfig, t: torch.Tensor) -> WeightFormat | None:
    """The format of a stored tensor that loads dequantized: FP8 (e4m3), or DeepSeek-V4's FP4 routed
    experts (int8 in a checkpoint whose quantization_config says expert_dtype fp4); None otherwise."""
    if t.dtype == FP8.stored_dtype:
        return FP8
    if t.dtype == FP4.stored_dtype and (cfg.quantization_config or {}).get("expert_dtype") == "fp4":
        return FP4
    return None


def dequantized(files: dict[str, Path], file: Path, key: str, t: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """The fp32 weight a stored quantized `t` (with its companions) stands for."""
    parts = read_parts(files, file, key, t, fmt)
    try:
        return fmt.dequantize(parts, torch.float32)
    except RuntimeError as e:
        raise CheckpointError(f"{file}: {key} and its {fmt.name} scales do not fit together ({e})") from None


def by_file(files: dict[str, Path], skip: set[str] = frozenset()) -> dict[Path, list[str]]:
    """The keys to read from each file (in the checkpoint's order), leaving out `skip`."""
    out: dict[Path, list[str]] = {}
    for key, file in files.items():
        if key not in skip:
            out.setdefault(file, []).append(key)
    return out


# ----------------------------------------------------------------------------- save

def parse_size(size: int | str, what: str = "max_shard_size") -> int:
    """Bytes from an int or a string like '5GB', '512MB', '1.5G' (binary units)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", size.upper())
    if not m:
        raise ValueError(f"{what}={size!r}: expected bytes or a string like '5GB'")
    return int(float(m[1]) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m[2]])


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json: which shard holds each key, keys in natural order."""
    index = {"metadata": {"total_size": total_size},
             "weight_map": dict(sorted(weight_map.items(), key=lambda kv: natural_key(kv[0])))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


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
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors, key=natural_key):
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
            write_index(tmp, weight_map, total)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return path


# ----------------------------------------------------------------------------- load

def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    allow_unexpected: bool = False, quantize: str | None = None, group_size: int = 128,
                    keep: list[str] | None = None) -> Transformer:
    """Load a checkpoint directory of any family (``config.FAMILIES``: DeepSeek-V2/V3/R1, DeepSeekMoE-16B,
    Llama-layout DeepSeek-LLM/Coder/R1-Distill-Llama, Qwen2-layout R1-Distill-Qwen) written by
    nanoseek, transformers or DeepSeek.

    dtype: compute dtype of everything not held quantized, activations included (default: the
    config's torch_dtype; FP8 checkpoints load as bf16).
    allow_unexpected: skip (with a warning) tensors the model has no place for instead of failing.
    quantize: "int8" or "int4": quantize on load, tensor by tensor as the shards are read (an FP8
    weight is dequantized first), so peak memory is the quantized model plus one tensor; `keep`
    and `group_size` as for ``nanoseek quantize`` (the result equals quantizing and then loading).
    A checkpoint without the MTP layers (as transformers saves DeepSeek models) loads with MTP off.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    cfg = ModelConfig.from_hf(path)
    fmt = stored_format(cfg, path)
    files = checkpoint_files(path)
    if cfg.attention == "v4":  # DeepSeek's spelling on disk: read under nanoseek's module names
        files = v4_files(cfg, files)
    n = cfg.num_hidden_layers
    if cfg.num_nextn_predict_layers and not has_mtp_layers(cfg, files):
        where = "mtp.0.*" if cfg.attention == "v4" else f"model.layers.{n}.*"
        warnings.warn(f"{path}: no MTP layers ({where}) in the checkpoint; loading with MTP disabled")
        cfg = cfg.replace(num_nextn_predict_layers=0)
    held = fmt if fmt is not None and fmt.in_memory else None
    if quantize is not None:
        target = weight_format(quantize)
        if not target.in_memory:
            raise ValueError(f"quantize={quantize!r}: loads quantized only as int8 or int4")
        if held is not None and held is not target:
            raise ValueError(f"{path} is stored {held.name}; quantize={quantize!r} would requantize it "
                             f"(convert it with `nanoseek quantize --to {quantize}`)")
        if held is None:
            cfg = cfg.replace(quantization_config=target.config(group_size, keep))
            held = target
    loader = _Loader(path, cfg, files, held, allow_unexpected, on_load=quantize is not None and fmt is not held)
    loader.build(_compute_dtype(cfg, dtype), device)
    loader.load()
    return loader.model.eval()


def v4_files(cfg: ModelConfig, files: dict[str, Path]) -> RenamedFiles:
    """A V4 checkpoint's {key: file} under module names (a quantized weight's companions follow their
    weight). A key that names no module of the config is kept as it is (then reported unexpected)."""
    with torch.device("meta"):
        names = hf_keys(build_model(cfg))
    aliases = v4_stored_names(names, cfg.num_hidden_layers)
    suffixes = sorted({s for f in FORMATS.values() for s in f.companions}, key=len, reverse=True)
    renamed, stored = {}, {}
    for key, file in files.items():
        name = aliases.get(key)
        if name is None and key.endswith(".scale") and key[:-len("scale")] + "weight" in aliases:
            name = aliases[key[:-len("scale")] + "weight"] + "_scale_inv"  # DeepSeek's FP8/FP4 block scales
        if name is None:
            base = next((key[:-len(s)] for s in suffixes if key.endswith(s) and key[:-len(s)] in aliases), None)
            name = aliases[base] + key[len(base):] if base is not None else key
        renamed[name], stored[name] = file, key
    return RenamedFiles(renamed, stored)


def check_vocab(tokenizer: Tokenizer, model: Transformer, where) -> None:
    """Refuse a tokenizer whose ids the model cannot embed (naming the checkpoint and both sizes)."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{where}: tokenizer.json has {tokenizer.vocab_size} tokens but the model's "
                         f"vocab_size is {model.config.vocab_size}")


def load_with_tokenizer(path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", **kw) -> tuple[Transformer, Tokenizer]:
    """A checkpoint's model (``load_pretrained``, which takes the other keywords) and the tokenizer
    saved beside it, checked to fit."""
    tokenizer = Tokenizer.from_pretrained(path)
    model = load_pretrained(path, dtype=dtype, device=device, **kw)
    check_vocab(tokenizer, model, path)
    return model, tokenizer


def release_freed_memory() -> None:
    """Give the C heap's freed pages back to the system (glibc's malloc_trim; a no-op elsewhere).
    Reading and quantizing a shard frees many large temporaries that glibc keeps for reuse: measured
    on a V2-Lite cut, 2.2 GiB over a 2.1 GiB int4 model, enough to take a 24 GB machine past its
    memory at full size. Called every 64 tensors and after every shard."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _compute_dtype(cfg: ModelConfig, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    name = cfg.torch_dtype or "float32"
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point or dt.itemsize < 2:
        return torch.bfloat16 if dt is not None and dt.itemsize == 1 else torch.float32
    return dt


class _Loader:
    """One load: the checkpoint's files, the format held in memory (int8/int4, or None), the model
    being filled and the checkpoint keys filled so far."""

    def __init__(self, path: Path, cfg: ModelConfig, files: dict[str, Path], fmt: WeightFormat | None,
                 allow_unexpected: bool, on_load: bool = False):
        self.path, self.cfg, self.files, self.fmt, self.allow_unexpected = path, cfg, files, fmt, allow_unexpected
        self.on_load = on_load  # fmt is not stored: high-precision weights are quantized as they are read
        qc = cfg.quantization_config or {}
        self.modules_to_not_convert = qc.get("modules_to_not_convert")
        self.keep = list(qc.get("modules_to_not_convert", fmt.default_keep)) if fmt else []
        self.group_size = int(qc.get("group_size", 128))
        self.targets = quantized_keys(cfg, self.keep) if fmt else set()  # keys stored quantized
        self.seen: set[str] = set()
        self.experts: dict[tuple[str, int], dict[str, tuple]] = {}  # an expert's matrices until all 3 are read

    def build(self, dtype: torch.dtype, device) -> None:
        """The model on the meta device, its quantized modules swapped in, then allocated on `device`
        with its parameters in `dtype` (quantized modules' codes and bf16 scales are buffers: left alone)."""
        with torch.device("meta"):
            model = build_model(self.cfg)
        self.expected = set(hf_keys(model))
        if self.fmt is not None:
            try:
                swap_modules(model, self.fmt.name, self.group_size, self.keep)
            except ValueError as e:
                raise CheckpointError(f"{self.path / 'config.json'}: {e}") from None
        model = model.to_empty(device=device)
        for name, p in model.named_parameters():
            p.data = p.data.to(torch.float32 if self.cfg.attention == "v4" and keeps_fp32(name) else dtype)
        model.tie_weights()
        for m in model.modules():  # buffers that are computed, not stored
            if isinstance(m, RotaryEmbedding):
                m.inv_freq = rope_frequencies(model.config)[0].to(device)
            if isinstance(m, Rotary):
                m.inv_freq = m.frequencies().to(device)
            if isinstance(m, Gate) and m.e_score_correction_bias is not None:
                m.e_score_correction_bias = torch.zeros_like(m.e_score_correction_bias, dtype=torch.float32)
        self.model = model
        self.params = dict(model.named_parameters())
        self.params.update(model.named_buffers())

    def load(self) -> None:
        """Every tensor of the checkpoint into its place, file by file; then check nothing is missing."""
        fmt, files = self.fmt, self.files
        # companions are read with their weight; one is skipped even when its weight is missing, so
        # that the error names the weight
        suffixes = (fmt.companions if fmt else ()) + FP8.companions
        companions = {c for key in files.keys() | self.targets for c in companion_keys(key, suffixes) if c in files}
        for file, keys in by_file(files, skip=companions).items():
            with open_safetensors(file) as f:
                for n, key in enumerate(keys, 1):
                    if n % 64 == 0:
                        release_freed_memory()
                    t = read_tensor(f, file, stored_key(files, key))
                    if not self.on_load and self._stored_quantized(key):
                        self.seen.update(self._load_quantized(key, t, file))
                        continue
                    packed = packed_format(self.cfg, t)
                    if packed is not None:
                        t = dequantized(files, file, key, t, packed)
                    if self.on_load and key in self.targets:
                        self._check_float(key, t, file)
                        parts = fmt.quantize(t.float(), self.group_size, key)
                        self.seen.update(self._install(key, parts, file))
                        continue
                    self.seen.update(self._assign(key, t, file))
            release_freed_memory()
        missing = sorted(self.expected - self.seen, key=natural_key)
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(f"{self.path}: missing tensor(s) {', '.join(missing[:5])}{more}")

    def _stored_quantized(self, key: str) -> bool:
        """A key the config converts, or a weight stored with its format's scale beside it."""
        fmt = self.fmt
        return fmt is not None and (key in self.targets or (key.endswith(".weight")
                                                            and key + fmt.companions[0] in self.files))

    def _assign(self, key: str, t: torch.Tensor, file: Path) -> list[str]:
        """Copy a high-precision t into its place; returns the checkpoint keys it covered."""
        params = self.params

        def check_shape(target_shape, what=key):
            if tuple(t.shape) != tuple(target_shape):
                raise CheckpointError(f"{file}: {what} has shape {tuple(t.shape)}, the config implies "
                                      f"{tuple(target_shape)}")

        self._check_float(key, t, file)
        m = EXPERT_KEY.match(key)
        if m and f"{m[1]}.{m[3]}" in params:
            target = params[f"{m[1]}.{m[3]}"]
            e = int(m[2])
            if e >= target.shape[0]:
                return self._unexpected(key, file)
            check_shape(target.shape[1:])
            with torch.no_grad():
                target[e].copy_(t)
            return [key]
        m = FUSED_EXPERT_KEY.match(key)  # transformers-5 in-memory layout, if ever saved that way
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
            return expert_keys(m[1], params[f"{m[1]}.down_proj"].shape[0], names)
        if is_mtp_shared_copy(self.cfg, key) or is_computed(key):
            return []  # copies of the shared embedding / head; rotary frequencies
        if key not in params:
            return self._unexpected(key, file)
        check_shape(params[key].shape)
        with torch.no_grad():
            params[key].copy_(t)
        return [key]

    @staticmethod
    def _check_float(key: str, t: torch.Tensor, file: Path) -> None:
        if not (t.dtype.is_floating_point or key.endswith(("e_score_correction_bias", "tid2eid"))):
            raise CheckpointError(f"{file}: {key} has dtype {t.dtype}; expected a floating-point tensor")

    def _unexpected(self, key: str, file: Path) -> list[str]:
        if not self.allow_unexpected:
            raise CheckpointError(f"{file}: unexpected tensor {key} (the config has no place for it; "
                                  "pass allow_unexpected=True to skip it)")
        warnings.warn(f"{file}: skipping unexpected tensor {key}")
        return []

    def _load_quantized(self, key: str, t: torch.Tensor, file: Path) -> list[str]:
        """Check one stored quantized weight against the module that takes it and copy it in."""
        fmt = self.fmt
        if key not in self.targets:
            raise CheckpointError(f"{file}: {key} is stored quantized but config.json's quantization_config "
                                  f"(modules_to_not_convert={self.modules_to_not_convert}) keeps it in high "
                                  "precision")
        if t.dtype != fmt.stored_dtype:
            raise CheckpointError(f"{file}: {key} has dtype {t.dtype}; an {fmt.name} checkpoint stores it as "
                                  f"{fmt.stored_dtype} (config.json quantization_config.quant_method={fmt.name})")
        return self._install(key, read_parts(self.files, file, key, t, fmt), file)

    def _install(self, key: str, parts: dict[str, torch.Tensor], file: Path) -> list[str]:
        """Check one quantized weight's parts against the module that takes them and copy them in."""
        fmt = self.fmt
        if is_mtp_shared_copy(self.cfg, key):
            return [key]  # the MTP layers' copy of lm_head, which the model shares
        name = key.removesuffix(".weight")
        m = EXPERT_KEY.match(key)
        if m:
            module, e, proj = self.model.get_submodule(m[1]), int(m[2]), m[3]
            shape = (module.inter_dim, module.dim) if proj != "down_proj" else (module.dim, module.inter_dim)
        else:
            module = self.model.get_submodule(name)
            shape = (module.out_features, module.in_features)
        if not isinstance(module, (QuantLinear, QuantExperts)):
            raise CheckpointError(f"{file}: {key} is stored {fmt.name} but the model holds {name} in high precision")
        for suffix, want in fmt.stored_shapes(shape, self.group_size, key).items():
            got = parts[suffix]
            if suffix and not got.dtype.is_floating_point:
                raise CheckpointError(f"{file}: {key + suffix} has dtype {got.dtype}; expected floating point")
            if tuple(got.shape) != want:
                raise CheckpointError(f"{file}: {key + suffix} has shape {tuple(got.shape)}, the config implies "
                                      f"{want}{fmt.layout_hint(self.group_size)}")
        if m:  # an expert's three matrices go in together; installed at once so no copy waits in memory
            projs = self.experts.setdefault((m[1], e), {})
            projs[proj] = fmt.ordered(parts)
            if len(projs) == 3:
                module.set_expert(e, projs["gate_proj"], projs["up_proj"], projs["down_proj"])
                del self.experts[(m[1], e)]
        else:
            module.set_quantized(*fmt.ordered(parts))
        return [key]
