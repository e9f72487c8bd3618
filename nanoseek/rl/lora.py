"""LoRA adapters through `peft`, applied to a built nanoseek model from outside, and merged back.

    model = add_lora(model, rank=16, alpha=32)            # only the adapters train
    with merged(model):                                   # rollouts on W + BA (no adapter overhead)
        engine.generate(...)
    plain = merge_and_unload(model)                        # a plain Transformer: save_pretrained -> HF

Targets (LORA_TARGETS): every attention projection of MLA (q_proj or q_a_proj/q_b_proj,
kv_a_proj_with_mqa, kv_b_proj, o_proj), of grouped-query attention (q/k/v/o_proj: Llama, Qwen2,
DeepSeek-LLM/MoE-16B) or of DeepSeek-V4 (q_a_proj/q_b_proj, kv_proj, o_b_proj; its grouped o_a_proj
is not an nn.Linear) and the dense and shared-expert MLPs (gate/up/down_proj).
The routed experts stay frozen: they are stacked 3-D tensors (model.Experts), not nn.Linear, and
adapting each of them would multiply the adapter count by n_routed_experts; the router, norms and
embeddings stay frozen too. The engine's absorbed attention reads kv_b_proj.weight directly, so
rollouts run inside `merged(model)`: the adapters are folded into the weights and taken out again
after, and every rollout sees the live adapted policy.
"""

from __future__ import annotations

import contextlib
import re
import sys

from torch import nn

LORA_TARGETS = r".*\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|k_proj|v_proj|o_proj|kv_proj|" \
               r"o_b_proj)|" \
               r"mlp\.(gate_proj|up_proj|down_proj)|mlp\.shared_experts\.(gate_proj|up_proj|down_proj))$"


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             target_modules: str = LORA_TARGETS) -> nn.Module:
    """Inject LoRA adapters (peft) into `model` in place; freeze every other weight. Returns model."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank={rank}: must be at least 1")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none")
    # Injected into the backbone, which carries no `config`: peft would read the DeepSeek model_type off
    # the Transformer and apply its transformers-specific MoE handling to our stacked experts.
    inject_adapter_in_model(config, model.model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"LoRA: no module of the model matches {target_modules!r}")
    return model


def lora_layers(model: nn.Module) -> list[nn.Module]:
    if "peft" not in sys.modules:  # no adapter can exist before peft is imported: skip its ~2 s import
        return []
    from peft.tuners.lora import LoraLayer
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def merged(model: nn.Module):
    """Fold the adapters into the base weights for the duration (no-op without LoRA)."""
    layers = lora_layers(model)
    for layer in layers:
        layer.merge()
    try:
        yield model
    finally:
        for layer in layers:
            layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight and put the plain nn.Linear back, in place: the result
    has the original module tree and checkpoint keys (hf.io.save_pretrained writes a plain HF checkpoint)."""
    for layer in lora_layers(model):
        layer.merge()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if hasattr(child, "base_layer") and re.search(r"lora", type(child).__module__):
                base = child.base_layer
                base.weight.requires_grad_(True)
                setattr(module, child_name, base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
