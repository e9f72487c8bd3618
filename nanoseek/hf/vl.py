"""DeepSeek-VL checkpoints (``model_type`` deepseek_vl and deepseek_vl_hybrid) in and out.

    vl = load_vl("deepseek-vl-7b-chat")        # VLModel; config.json's text/vision/high_res blocks
    save_vl(vl, "out/my-vl")                    # transformers' DeepseekVL*ForConditionalGeneration loads it

Keys: the vision parts' module names are the checkpoint keys (``model.vision_model.*``,
``model.high_res_vision_*``, ``model.aligner.*``); the language model's are its own family's
keys (``keys.py``: experts split, rotary buffers skipped) with ``model.`` -> ``model.language_model.``,
and ``lm_head.weight`` (absent when tie_word_embeddings). Loading is strict: a missing or
unexpected key, or a wrong shape, is a CheckpointError naming it. Weights load in the
checkpoint's dtype or `dtype`; quantized VL checkpoints are not read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..layers import RotaryEmbedding, rope_frequencies
from ..tokenizer import Tokenizer
from ..vision.image import ImageProcessor
from ..vision.vl import VL_TYPES, VLConfig, VLModel
from .io import CheckpointError, check_vocab, checkpoint_files, open_safetensors, read_tensor, save_pretrained
from .keys import EXPERT_KEY, STACKED_EXPERTS, hf_keys, hf_state_dict, is_computed, is_mtp_shared_copy

LANG, HEAD = "model.language_model.", "lm_head.weight"


def to_vl_key(language_key: str) -> str:
    """A language-model checkpoint key -> its key inside a VL checkpoint."""
    return language_key if language_key == HEAD else LANG + language_key.removeprefix("model.")


def from_vl_key(key: str) -> str | None:
    """A VL checkpoint key -> the language model's own key (None for a vision key)."""
    if key == HEAD:
        return key
    return "model." + key.removeprefix(LANG) if key.startswith(LANG) else None


def vl_state_dict(vl: VLModel) -> dict[str, torch.Tensor]:
    """Every tensor of `vl` under its DeepSeek-VL checkpoint key."""
    out = {f"model.{k}": v.detach().contiguous() for k, v in vl.model.state_dict().items()}
    out.update({to_vl_key(k): v for k, v in hf_state_dict(vl.language).items()})
    return out


def save_vl(vl: VLModel, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> Path:
    """config.json (the VL layout) + safetensors, atomically; other files in `path` are kept."""
    return save_pretrained(vl.language, path, max_shard_size, tensors=vl_state_dict(vl), config=vl.config.to_hf())


def is_vl_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` holds a DeepSeek-VL config.json."""
    config = Path(path) / "config.json"
    return config.exists() and json.loads(config.read_text()).get("model_type") in VL_TYPES


def load_vl(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> VLModel:
    """A DeepSeek-VL checkpoint directory (written by nanoseek, transformers or converted from DeepSeek's)."""
    path = Path(path)
    try:
        cfg = VLConfig.from_hf(json.loads((path / "config.json").read_text()), where=str(path / "config.json"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no config.json") from None
    files = checkpoint_files(path)
    vl = _empty_model(cfg, device)
    targets = {f"model.{k}": t for k, t in vl.model.state_dict(keep_vars=True).items()}
    targets.update({to_vl_key(k): t for k, t in vl.language.state_dict(keep_vars=True).items()
                    if not (k == HEAD and cfg.text.tie_word_embeddings)})
    expected = {k for k in targets if not STACKED_EXPERTS.match(from_vl_key(k) or "")}
    expected |= {to_vl_key(k) for k in hf_keys(vl.language)}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for key, file in sorted(files.items()):
        lang = from_vl_key(key)
        if lang is not None and (is_computed(lang) or is_mtp_shared_copy(cfg.text, lang)):
            continue
        if key not in expected:
            raise CheckpointError(f"{file}: unexpected tensor {key} (the {cfg.model_type} model has no place for it)")
        with open_safetensors(file) as f:
            t = read_tensor(f, file, key)
        m = EXPERT_KEY.match(lang or "")
        if m:  # one expert's matrix -> a row of the stacked parameter
            experts.setdefault(to_vl_key(f"{m[1]}.{m[3]}"), {})[int(m[2])] = t
        else:
            _copy(targets[key], t, key, file)
    for stacked, rows in experts.items():
        _copy(targets[stacked], torch.stack([rows[e] for e in sorted(rows)]), stacked, path)
    missing = sorted(expected - set(files))
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    dtype = dtype or getattr(torch, str(cfg.text.torch_dtype or "float32").removeprefix("torch."))
    for p in vl.parameters():  # buffers (rotary frequencies, router biases) stay fp32
        p.data = p.data.to(dtype)
    return vl.eval()


def load_image_processor(path: str | os.PathLike, cfg: VLConfig) -> ImageProcessor:
    """The checkpoint's preprocessor_config.json (sizes, means, stds), else the towers' sizes with
    the reference processor's defaults."""
    file = Path(path) / "preprocessor_config.json"
    if not file.exists():
        return ImageProcessor.for_config(cfg)
    return ImageProcessor.from_hf(json.loads(file.read_text()), hybrid=cfg.high_res is not None)


def load_vl_with_tokenizer(path: str | os.PathLike, dtype: torch.dtype | None = None,
                           device: str | torch.device = "cpu") -> tuple[VLModel, Tokenizer]:
    tokenizer = Tokenizer.from_pretrained(path)
    vl = load_vl(path, dtype, device)
    check_vocab(tokenizer, vl.language, path)
    return vl, tokenizer


def _empty_model(cfg: VLConfig, device) -> VLModel:
    """The model allocated on `device` without initialisation; computed buffers filled in."""
    with torch.device("meta"):
        vl = VLModel(cfg)
    vl.to_empty(device=device)
    vl.language.tie_weights()
    for m in vl.modules():
        if isinstance(m, RotaryEmbedding):
            m.inv_freq = rope_frequencies(cfg.text)[0].to(device)
    return vl


def _copy(target: torch.Tensor, t: torch.Tensor, key: str, file) -> None:
    if tuple(target.shape) != tuple(t.shape):
        raise CheckpointError(f"{file}: {key} has shape {tuple(t.shape)}, the config gives {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(t.to(target.dtype))
