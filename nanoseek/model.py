"""The transformer of every DeepSeek family, built from primitives in reading order.

    layers.py     Linear -> RMSNorm -> rotary embedding (default, linear, llama3, YaRN)
    attention.py  MLA (DeepSeek-V2/V3) | GQA (Llama, Qwen2, DeepSeek-LLM/Coder/MoE-16B)
    here          MLP (dense SwiGLU) -> Gate -> Experts -> MoE (DeepSeekMoE) -> Block -> MTPLayer -> Transformer

The config picks the variants: ``cfg.attention`` the attention class, ``cfg.is_moe_layer(i)``
whether layer i's feed-forward is DeepSeekMoE or the dense MLP, ``num_nextn_predict_layers`` the
MTP modules. Module names are the Hugging Face checkpoint keys (``model.layers.N.self_attn.q_proj``,
``model.layers.N.mlp.gate.e_score_correction_bias`` ...), so ``model.state_dict()`` reads like the
family's checkpoint; the one difference is that routed experts are stacked into 3-D tensors
(``mlp.experts.gate_proj`` is ``[E, I, D]``), which ``hf/keys.py`` splits per expert on save.

Shapes: B batch, T query tokens, D hidden, E routed experts, K experts per token (attention's in
attention.py).

The model is single-device and dtype-agnostic: parallelism, quantization, compile and dtype are
applied from outside (``model.to(torch.bfloat16)``, ``quant.quantize_model(model)``, ``torch.compile``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .attention import ATTENTION, GQA, MLA, Ragged
from .config import ModelConfig
from .kernels import group_by_expert, linear, sort_by_expert, swiglu
from .layers import Linear, RMSNorm, RotaryEmbedding, apply_rotary, rope_frequencies

# The primitives and attention classes were first defined here; callers may import them from here.
__all__ = ["Linear", "RMSNorm", "RotaryEmbedding", "apply_rotary", "rope_frequencies", "MLA", "GQA", "MLP",
           "Gate", "Experts", "MoE", "Block", "MTPLayer", "CausalLM", "Transformer", "document_mask"]


# ----------------------------------------------------------------------------- feed-forward

class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers and shared experts; `limit` clips (V4)."""

    def __init__(self, dim: int, inter_dim: int, limit: float | None = None):
        super().__init__()
        self.gate_proj = Linear(dim, inter_dim, bias=False)
        self.up_proj = Linear(dim, inter_dim, bias=False)
        self.down_proj = Linear(inter_dim, dim, bias=False)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


class Gate(nn.Module):
    """The router: scores every routed expert and picks K per token.

    scoring  softmax (V2), sigmoid (V3) or sqrt(softplus) (V4) of h·e_i, computed in fp32.
    choice   greedy top-K; group_limited_greedy (V2): keep the topk_group groups with the highest
             max score; noaux_tc (V3): add the balancing bias b_i, rank groups by the sum of their top-2
             biased scores. The bias steers the choice only: weights come from unbiased scores.
    weights  the chosen scores, renormalised when norm_topk_prob, times routed_scaling_factor.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scoring_func, self.topk_method = cfg.scoring_func, cfg.topk_method
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            # Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): nudged by the trainer, not by gradients.
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> weights [N, K] (fp32), indices [N, K], scores [N, E] (fp32, unbiased)."""
        logits = F.linear(x.float(), self.weight.float())
        scores = SCORING[self.scoring_func](logits)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()
        if self.topk_method != "greedy" and self.n_group > 1:
            grouped = choice.unflatten(-1, (self.n_group, -1))  # [N, G, E/G]
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            else:
                group_scores = grouped.amax(-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices  # [N, topk_group]
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, indices, scores


SCORING = {"softmax": lambda z: z.softmax(-1), "sigmoid": torch.sigmoid, "sqrtsoftplus": lambda z: F.softplus(z).sqrt()}


class Experts(nn.Module):
    """E routed SwiGLU experts stored stacked: gate_proj/up_proj [E, I, D], down_proj [E, D, I].

    Tokens are sorted by expert and each expert multiplies one contiguous slice: a loop over
    experts, never over tokens.
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int, limit: float | None = None):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.limit = limit  # DeepSeek-V4's SwiGLU clip (kernels.swiglu)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        N, K = indices.shape
        if N * K <= self.gate_proj.shape[0] and not torch.is_grad_enabled():
            # under torch.compile, an opaque op: its Python grouping by expert is not traced
            few = routed_experts_few if torch.compiler.is_compiling() else _routed_experts_few
            return few(x, weights, indices, self.gate_proj, self.up_proj, self.down_proj, self.limit)
        order, counts = sort_by_expert(indices, self.gate_proj.shape[0])  # [N*K] pair ids grouped by expert
        token = order // K
        # The routing weight scales the (narrower) intermediate activation: same result as
        # scaling the expert's output, half the elementwise work in forward and backward.
        gates = weights.flatten()[order].unsqueeze(-1).to(x.dtype)
        out = expert_products(x[token], gates, counts, self.gate_proj, self.up_proj, self.down_proj, limit=self.limit)
        return torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))


def expert_products(xs: torch.Tensor, gates: torch.Tensor, counts: list[int], gate_proj: torch.Tensor,
                    up_proj: torch.Tensor, down_proj: torch.Tensor, grouped: bool | None = None,
                    limit: float | None = None) -> torch.Tensor:
    """Rows grouped by expert -> each row's gated expert output: xs [M, D] holds counts[e] rows for
    expert e in turn, gates [M, 1] their routing weights -> [M, D]. Expert parallelism
    (train/expert_parallel.py) calls this on the rows other ranks dispatched to this one.

    grouped (default: CUDA sm90+ in bf16): one ``torch._grouped_mm`` per projection over all experts
    (offsets = cumulative counts) instead of a Python loop of per-expert matmuls; the same products
    (bit for bit on a CPU, where the test runs it)."""
    if grouped is None:  # its strides must be multiples of 16 bytes
        grouped = _has_grouped_mm(xs) and xs.shape[-1] % 8 == 0 and gate_proj.shape[1] % 8 == 0
    if grouped:
        dtype = torch.get_autocast_dtype(xs.device.type) if torch.is_autocast_enabled(xs.device.type) else xs.dtype
        offs = torch.tensor(counts, device=xs.device).cumsum(0).to(torch.int32)
        xs, gates = xs.to(dtype).contiguous(), gates.to(dtype)
        mm = functools.partial(_grouped_mm, offs=offs)
        h = swiglu(mm(xs, gate_proj.to(dtype).mT), mm(xs, up_proj.to(dtype).mT), limit) * gates
        return mm(h, down_proj.to(dtype).mT)
    # unbind once: indexing a stacked parameter per expert would make autograd build a
    # zero-filled [E, ...] gradient for every slice.
    w_gate, w_up, w_down = gate_proj.unbind(0), up_proj.unbind(0), down_proj.unbind(0)
    outs = []
    for e, (h, g) in enumerate(zip(xs.split(counts), gates.split(counts))):
        if h.shape[0]:
            outs.append(swiglu(h @ w_gate[e].t(), h @ w_up[e].t(), limit) * g @ w_down[e].t())
    return torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[-1])


def _has_grouped_mm(x: torch.Tensor) -> bool:
    """Where torch._grouped_mm pays: CUDA sm90+ in bf16. It also runs (exactly) on a CPU, but there it is
    a loop of matmuls itself and measured no faster (BENCHMARKS.md), and its fake-tensor rule wants
    bf16, so torch.compile could not trace it: the CPU keeps the loop."""
    return (hasattr(torch, "_grouped_mm") and x.device.type == "cuda"
            and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and (x.dtype == torch.bfloat16 or torch.is_autocast_enabled("cuda")))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: _grouped_mm's backward
    rejects broadcast (stride-0) gradients, such as the one ``y.sum().backward()`` sends."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(torch._grouped_mm(a, b, offs=offs))


def _routed_experts_few(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, gate_proj: torch.Tensor,
                        up_proj: torch.Tensor, down_proj: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """Decoding (a few tokens, no autograd): group the (token, expert) pairs in Python and read
    only the chosen experts' weights, with no sort and no per-step view of all E experts."""
    gates = weights.flatten().to(x.dtype).unsqueeze(-1)  # [N*K, 1]
    y = torch.zeros_like(x)
    for e, tok, pairs in group_by_expert(indices, gate_proj.shape[0]):
        h = x[tok]
        h = swiglu(linear(h, gate_proj[e]), linear(h, up_proj[e]), limit) * gates[pairs]
        h = linear(h, down_proj[e])
        if isinstance(tok, slice):  # one token: a slice add, cheaper than index_add_ at decode sizes
            y[tok] += h
        else:
            y.index_add_(0, tok, h)
    return y


routed_experts_few = torch.library.custom_op("nanoseek::routed_experts_few", mutates_args=())(_routed_experts_few)
routed_experts_few.register_fake(lambda x, *rest: torch.empty_like(x))


class MoE(nn.Module):
    """DeepSeekMoE: shared experts every token uses + K of E fine-grained routed experts.

    After each forward, ``load`` holds the tokens each routed expert received (for
    balancing and the load heatmap); in training, ``scores`` and ``indices`` are kept
    for the sequence-wise balance loss.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.swiglu_limit)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.swiglu_limit)
                               if cfg.n_shared_experts else None)
        self.load: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.indices: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., D] -> [..., D]; input_ids [...] only for a gate that routes by token (V4's hash MoE)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        weights, indices, scores = self.gate(x) if input_ids is None else self.gate(x, input_ids.reshape(-1))
        y = self.experts(x, weights, indices)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        with torch.no_grad():  # counted into a fixed-size vector (bincount's size depends on the data)
            flat = indices.flatten()
            self.load = torch.zeros(scores.shape[-1], dtype=torch.long, device=flat.device).scatter_add_(
                0, flat, torch.ones_like(flat))
        if self.training:
            self.scores, self.indices = scores.view(*shape[:-1], -1), indices.view(*shape[:-1], -1)
        return y.view(shape)


# ----------------------------------------------------------------------------- blocks

class Block(nn.Module):
    """Pre-norm residual block: h += attention(norm(h)); h += FFN(norm(h)), FFN being DeepSeekMoE on
    the layers the config makes MoE and the dense MLP elsewhere."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.self_attn = ATTENTION[cfg.attention](cfg, layer_id)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, mask=None, cache=None, absorb=False):
        x = self.input_layernorm(h)
        if isinstance(cache, Ragged):  # rows of different lengths in one forward: attention part by part
            h = h + cache.attend(self.self_attn, x, cos, sin)
        else:
            h = h + self.self_attn(x, cos, sin, mask, cache, absorb)
        return h + self.mlp(self.post_attention_layernorm(h))


class SharedHead(nn.Module):
    """The MTP module's output norm; its projection is the main model's lm_head (shared)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(Block):
    """Multi-token prediction module k (DeepSeek-V3 §2.2).

    h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]), then one transformer block; the
    shared head predicts t_{i+k+1}. Embedding and output head are the main model's. Stored at
    checkpoint layer index num_hidden_layers + k - 1, as DeepSeek-V3 ships it.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h_prev, emb, cos, sin, mask=None, cache=None, absorb=False):
        h = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h_prev)), dim=-1))
        return super().forward(h, cos, sin, mask, cache, absorb)


class Backbone(nn.Module):
    """``model.*`` in the checkpoint: embeddings, main layers then MTP layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        n = cfg.num_hidden_layers
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(n)] +
                                    [MTPLayer(cfg, n + k) for k in range(cfg.num_nextn_predict_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


class CausalLM(nn.Module):
    """What every family's causal LM shares: the config, ``model.*`` (the family's `backbone`:
    embeddings, main then MTP layers, final norm), the output head (tied or not), the main/MTP
    split of the layers and parameter counts. ``Transformer`` below and ``v4.V4Transformer``."""

    backbone: type[nn.Module]

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = self.backbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None):
        raise NotImplementedError

    def tie_weights(self):
        """Share embedding and output head when tie_word_embeddings (again after to_empty/meta moves)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def main_layers(self) -> list[nn.Module]:
        return list(self.model.layers[:self.config.num_hidden_layers])

    @property
    def mtp_layers(self) -> list[nn.Module]:
        return list(self.model.layers[self.config.num_hidden_layers:])

    def num_params(self, active: bool = False, include_mtp: bool = True) -> int:
        """Parameter count; active=True counts only the K routed experts a token uses."""
        cfg = self.config
        total = 0
        for name, p in self.named_parameters():
            layer_idx = _layer_index(name)
            if not include_mtp and layer_idx is not None and layer_idx >= cfg.num_hidden_layers:
                continue
            n = p.numel()
            if active and ".experts." in name:
                n = n * cfg.num_experts_per_tok // cfg.n_routed_experts
            total += n
        return total


class Transformer(CausalLM):
    """The causal LM of every family but DeepSeek-V4 (``ModelConfig.model_type``).

    ``model(input_ids)`` -> logits [B, T, vocab]. ``forward_train`` returns the final hidden
    states and the MTP logits (the inference engine runs the MTP module itself to draft).
    """

    backbone = Backbone

    # -- construction
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """N(0, initializer_range) for matrices, ones for norms, zeros for balancing biases."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("norm.bias"):  # the indexer's LayerNorm
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
        for m in self.modules():
            if isinstance(m, Gate) and m.e_score_correction_bias is not None \
                    and m.e_score_correction_bias.device.type != "meta":
                m.e_score_correction_bias.zero_()

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    # -- forward
    def _rope(self, input_ids, positions, dtype):
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        return self.model.rotary_emb(positions, dtype)

    def forward_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None, cache=None, absorb: bool = False,
                       inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> last layer's output [B, T, D], before the final norm.

        inputs_embeds [B, T, D], when given, is used instead of embedding input_ids (a
        vision-language prompt's image tokens: ``vision.vl``)."""
        h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self._rope(input_ids, positions, h.dtype)
        for layer in self.main_layers:
            h = layer(h, cos, sin, mask, cache, absorb)
        return h

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, cache=None, absorb: bool = False,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab_size].

        positions [B, T] (default 0..T-1), mask bool [B, 1, T, S] (default causal),
        cache/absorb: see ``MLA.forward``; the engine drives these; inputs_embeds: see forward_hidden.
        """
        h = self.forward_hidden(input_ids, positions, mask, cache, absorb, inputs_embeds)
        return self.lm_head(self.model.norm(h))

    def forward_train(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """For training: (final normed hidden [B, T, D], [MTP logits [B, T, V] per depth]).

        MTP depth k's logits at position i predict token i+k+1; the last k positions of each
        row (and positions whose targets cross a document) are for the loss to mask.
        """
        h = self.forward_hidden(input_ids, positions, mask)
        hidden = self.model.norm(h)
        mtp_logits = []
        if self.mtp_layers:
            cos, sin = self._rope(input_ids, positions, h.dtype)
            h_prev = hidden
            for k, layer in enumerate(self.mtp_layers, start=1):
                emb = self.model.embed_tokens(torch.roll(input_ids, -k, dims=1))  # Emb(t_{i+k})
                h_prev = layer(h_prev, emb, cos, sin, mask)
                mtp_logits.append(self.lm_head(layer.shared_head.norm(h_prev)))
        return hidden, mtp_logits


def add_indexers(model: Transformer, index_topk: int, index_n_heads: int, index_head_dim: int,
                 seed: int = 0) -> Transformer:
    """A DeepSeek-V3 model as a V3.2 (DSA) one to continue training, as DeepSeek did: the same weights,
    plus freshly initialised lightning indexers of the given shape (V3.2 §2.1.1's warm-up then trains
    them). With at most index_topk tokens of context every token is chosen, so the new model's
    outputs equal the old one's until the context outgrows k."""
    cfg = model.config.replace(model_type="deepseek_v32", index_topk=index_topk, index_n_heads=index_n_heads,
                               index_head_dim=index_head_dim)
    torch.manual_seed(seed)
    new = Transformer(cfg).to(next(model.parameters()).dtype)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(".indexer." not in k for k in missing):
        raise ValueError(f"not a DeepSeek-V3-shaped model: unexpected {unexpected[:3]}, missing "
                         f"{[k for k in missing if '.indexer.' not in k][:3]}")
    return new


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
        return int(parts[2])
    return None


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Causal mask that also blocks attention across packed documents.

    doc_ids [B, T] (equal ids = same document) -> bool [B, 1, T, T], True = may attend.
    """
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)
    return (causal & same).unsqueeze(1)
