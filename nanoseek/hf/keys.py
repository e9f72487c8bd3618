"""The Hugging Face key mapping, both ways, in one place: nanoseek module names <-> checkpoint keys.

    tensors = hf_state_dict(model)            # the model's tensors under checkpoint keys (save)
    expected = hf_keys(model)                 # the keys a complete checkpoint of it holds (load)
    m = EXPERT_KEY.match(key)                 # a per-expert key -> (stacked name, expert, projection)

nanoseek's module names are the checkpoint keys of every family it builds (DeepSeek-V2/V3's
``model.layers.N.self_attn.kv_a_proj_with_mqa.weight``; Llama's, Qwen2's and DeepSeekMoE-16B's
``model.layers.N.self_attn.q_proj.weight``/``.bias``, ``mlp.shared_experts.*``) except where this
file says otherwise:

    routed experts  nanoseek stacks ``model.layers.N.mlp.experts.gate_proj`` [E, I, D]; checkpoints
                    hold ``model.layers.N.mlp.experts.E.gate_proj.weight`` per expert (and
                    transformers 5's in-memory layout fuses ``experts.gate_up_proj`` [E, 2I, D])
    MTP             module k sits at ``model.layers.{num_hidden_layers + k}``; DeepSeek-V3 also stores
                    there copies of the shared embedding and output head (``embed_tokens``,
                    ``shared_head.head``), written on save and skipped on load
    tied head       ``lm_head.weight`` is not written when tie_word_embeddings
    DSA indexer     DeepSeek-V3.2's ``model.layers.N.self_attn.indexer.{wq_b,wk,weights_proj}.weight`` and
                    ``indexer.k_norm.{weight,bias}`` are nanoseek's module names as they stand (FP8 blocks
                    of wq_b/wk dequantized on load like every other weight)
    rotary buffers  older Llama-layout checkpoints store ``self_attn.rotary_emb.inv_freq``; it is
                    computed from the config, so it is skipped on load and never written
    quantized       a stored weight keeps its key; its companions sit at ``<key><suffix>`` with the
                    format's suffixes (``quant.formats``: ``_scale``, ``_min``, FP8's ``_scale_inv``)
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..config import ModelConfig
from ..model import Experts, Transformer
from ..quant.formats import is_kept

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
STACKED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
FUSED_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
MTP_SHARED = re.compile(r"^model\.layers\.(\d+)\.(embed_tokens\.weight|shared_head\.head\.weight)$")
COMPUTED = re.compile(r"\.rotary_emb\.inv_freq$")


def is_computed(key: str) -> bool:
    """A buffer some checkpoints store that the model computes from its config (rotary frequencies)."""
    return bool(COMPUTED.search(key))


def natural_key(key: str):
    """Sort key that orders layer and expert numbers as numbers (layers.2 before layers.10)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def expert_keys(stacked: str, n_experts: int, projs: tuple[str, ...] = EXPERT_PROJS) -> list[str]:
    """The per-expert checkpoint keys of a stacked Experts module named `stacked`."""
    return [f"{stacked}.{e}.{p}.weight" for p in projs for e in range(n_experts)]


def companion_keys(key: str, suffixes: tuple[str, ...]) -> list[str]:
    """The keys of a stored quantized weight's companions (a format's ``companions`` suffixes)."""
    return [key + s for s in suffixes]


# ----------------------------------------------------------------------------- MTP layers

def mtp_prefixes(cfg: ModelConfig) -> tuple[str, ...]:
    """The key prefixes of the MTP modules: ``model.layers.{num_hidden_layers + k}.``."""
    n = cfg.num_hidden_layers
    return tuple(f"model.layers.{n + k}." for k in range(cfg.num_nextn_predict_layers))


def has_mtp_layers(cfg: ModelConfig, keys) -> bool:
    """Whether a checkpoint's keys hold the MTP layers (transformers saves DeepSeek models without)."""
    return any(k.startswith(f"model.layers.{cfg.num_hidden_layers}.") for k in keys)


def is_mtp_shared_copy(cfg: ModelConfig, key: str) -> bool:
    """An MTP layer's copy of the shared embedding or output head (the model holds one of each)."""
    m = MTP_SHARED.match(key)
    return bool(m) and int(m[1]) >= cfg.num_hidden_layers


# ----------------------------------------------------------------------------- model -> checkpoint

MTP_COPIES = {"model.embed_tokens.weight": "embed_tokens.weight", "lm_head.weight": "shared_head.head.weight"}


def hf_tensors(cfg: ModelConfig, name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """One tensor of the model's state dict under its checkpoint keys: a stacked expert tensor split
    per expert, the tied head dropped, the embedding and head copied into every MTP layer. One name
    at a time, so a sharded run can export parameter by parameter (train/export.py)."""
    m = STACKED_EXPERTS.match(name)
    if m:
        return {f"{m[1]}.{e}.{m[2]}.weight": t[e] for e in range(t.shape[0])}
    out = {} if name == "lm_head.weight" and cfg.tie_word_embeddings else {name: t}
    if name in MTP_COPIES:
        out.update({prefix + MTP_COPIES[name]: t.detach().clone() for prefix in mtp_prefixes(cfg)})
    return out


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors under DeepSeek checkpoint keys (experts split, MTP shared copies added)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        out.update(hf_tensors(model.config, name, t))
    return {k: v.detach().contiguous() for k, v in out.items()}


def hf_keys(model: Transformer) -> list[str]:
    """The keys a complete checkpoint of `model` holds, the MTP layers' shared copies aside."""
    keys = []
    for name, t in model.state_dict(keep_vars=True).items():
        m = STACKED_EXPERTS.match(name)
        if m:
            keys += expert_keys(m[1], t.shape[0], (m[2],))
        elif not (name == "lm_head.weight" and model.config.tie_word_embeddings):
            keys.append(name)
    return keys


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
            keys.update(expert_keys(name, module.gate_proj.shape[0]))
    if "lm_head.weight" in keys:
        keys.update(prefix + "shared_head.head.weight" for prefix in mtp_prefixes(cfg))
    return keys
