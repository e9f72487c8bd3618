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
    DeepSeek-V4     nanoseek's names are transformers' in-memory ones; checkpoints use DeepSeek's published
                    spelling (``layers.N.attn.wq_a.weight``, ``layers.N.ffn.experts.E.w1.weight``,
                    ``hc_head_fn``, ``mtp.K.*``), which ``v4_checkpoint_key`` writes; ``v4_stored_names``
                    also reads the variant transformers saves (a ``model.`` prefix, ``attn.norm``)
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..config import ModelConfig
from ..model import Experts, Transformer
from ..models import build_model
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
        out = {f"{m[1]}.{e}.{m[2]}.weight": t[e] for e in range(t.shape[0])}
    else:
        out = {} if name == "lm_head.weight" and cfg.tie_word_embeddings else {name: t}
    if cfg.attention == "v4":  # DeepSeek's published spelling; its MTP module stores no embedding or head
        return {v4_checkpoint_key(k, cfg.num_hidden_layers): v for k, v in out.items()}
    if m:
        return out
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
        model = build_model(cfg)
    keys: set[str] = set()
    for name, module in model.named_modules():
        if is_kept(name, keep):
            continue
        if isinstance(module, nn.Linear) and not (name == "lm_head" and cfg.tie_word_embeddings):
            keys.add(f"{name}.weight")
        elif isinstance(module, Experts):
            keys.update(expert_keys(name, module.gate_proj.shape[0]))
    if "lm_head.weight" in keys and cfg.attention != "v4":
        keys.update(prefix + "shared_head.head.weight" for prefix in mtp_prefixes(cfg))
    return keys


# ----------------------------------------------------------------------------- DeepSeek-V4 spelling

# (nanoseek's name, the checkpoint's), outermost first; within a layer, then at the top level
V4_LAYER_NAMES = [
    ("self_attn.indexer.compressor.", "attn.indexer.compressor."), ("self_attn.indexer.q_b_proj.", "attn.indexer.wq_b."),
    ("self_attn.indexer.weights_proj.", "attn.indexer.weights_proj."), ("self_attn.compressor.", "attn.compressor."),
    ("self_attn.q_a_proj.", "attn.wq_a."), ("self_attn.q_a_norm.", "attn.q_norm."), ("self_attn.q_b_proj.", "attn.wq_b."),
    ("self_attn.kv_proj.", "attn.wkv."), ("self_attn.kv_norm.", "attn.kv_norm."), ("self_attn.o_a_proj.", "attn.wo_a."),
    ("self_attn.o_b_proj.", "attn.wo_b."), ("self_attn.sinks", "attn.attn_sink"),
    ("mlp.gate.e_score_correction_bias", "ffn.gate.bias"), ("mlp.", "ffn."),
    ("input_layernorm.", "attn_norm."), ("post_attention_layernorm.", "ffn_norm."),
    ("attn_hc.fn", "hc_attn_fn"), ("attn_hc.base", "hc_attn_base"), ("attn_hc.scale", "hc_attn_scale"),
    ("ffn_hc.fn", "hc_ffn_fn"), ("ffn_hc.base", "hc_ffn_base"), ("ffn_hc.scale", "hc_ffn_scale"),
    ("hc_head.hc_fn", "hc_head_fn"), ("hc_head.hc_base", "hc_head_base"), ("hc_head.hc_scale", "hc_head_scale"),
]
V4_LEAF_NAMES = [("kv_proj.", "wkv."), ("gate_proj.", "wgate."), ("position_bias", "ape"), ("kv_norm.", "norm.")]
V4_EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
V4_TOP_NAMES = {"model.embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight",
                "model.norm.weight": "norm.weight", "model.hc_head.hc_fn": "hc_head_fn",
                "model.hc_head.hc_base": "hc_head_base", "model.hc_head.hc_scale": "hc_head_scale"}
V4_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def v4_checkpoint_key(name: str, num_hidden_layers: int) -> str:
    """A V4 module name (experts split: ``mlp.experts.E.gate_proj.weight``) in DeepSeek's published spelling."""
    if name in V4_TOP_NAMES:
        return V4_TOP_NAMES[name]
    m = V4_LAYER.match(name)
    if not m:
        raise KeyError(f"{name}: not a DeepSeek-V4 module name")
    i, rest = int(m[1]), m[2]
    for ours, theirs in V4_LAYER_NAMES:
        if rest.startswith(ours):
            rest = theirs + rest[len(ours):]
            if ours.startswith("self_attn.") and "compressor." in ours:
                for a, b in V4_LEAF_NAMES:
                    rest = rest.replace("compressor." + a, "compressor." + b)
            break
    for ours, theirs in V4_EXPERT_NAMES.items():
        rest = re.sub(rf"(experts\.(\d+\.)?){ours}\.", rf"\g<1>{theirs}.", rest)
    return f"layers.{i}.{rest}" if i < num_hidden_layers else f"mtp.{i - num_hidden_layers}.{rest}"


def v4_stored_names(names, num_hidden_layers: int) -> dict[str, str]:
    """{a stored key: the module name it fills} for V4 module names (experts split): DeepSeek's
    spelling, and what transformers writes (a ``model.`` prefix; ``model.embed_tokens``,
    ``model.hc_head.*`` as they are; the attention's kv_norm as ``attn.norm``)."""
    out = {}
    for name in names:
        key = v4_checkpoint_key(name, num_hidden_layers)
        out[key] = name
        out["model." + key] = name
        if ".attn.kv_norm." in key:
            out["model." + key.replace(".attn.kv_norm.", ".attn.norm.")] = name
    for name in ("model.embed_tokens.weight", "model.hc_head.hc_fn", "model.hc_head.hc_base", "model.hc_head.hc_scale"):
        out[name] = name
    return out
