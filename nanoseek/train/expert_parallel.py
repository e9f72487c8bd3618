"""Expert parallelism, applied from outside the model: the routed experts of each MoE layer are split
across the ranks of an EP group, and tokens travel to the rank that owns their expert and back.

    moe.experts = ExpertParallel(moe.experts, group)      # parallelize.py does this for every MoE layer

The DeepSeek-V3 recipe, per MoE layer and micro-batch (every rank routes its own tokens with the
replicated gate, so the expert loads behind the balancing bias are counted where they always were):

  1. dispatch: the (token, expert) pairs are sorted by expert (so also by owner rank, experts being
     owned in contiguous blocks), the per-expert counts exchanged, and each pair's hidden state and
     routing weight sent to the owner with one ``all_to_all_single`` (differentiable);
  2. grouped expert products: the owner regroups what it received by local expert and runs each
     expert once over its rows (``model.expert_products``, the single-device code);
  3. combine: the outputs go back with the reverse ``all_to_all_single`` and are summed per token.

Shapes: N tokens on this rank, K experts per token, D hidden, E routed experts, P = E / ep local
experts, M pairs received.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from ..kernels import sort_by_expert
from ..model import Experts, expert_products


class ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale` (see parallelize.py: an expert's
    gradient gathers every EP peer's tokens, so it is scaled by 1/ep before FSDP's average)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class ExpertParallel(nn.Module):
    """Routed experts [E] split across `group`: rank r of the group holds experts [r·P, (r+1)·P).

    Its parameters keep Experts' names (gate_proj, up_proj, down_proj), holding only the local P
    experts, so the model's state-dict keys are unchanged; checkpointing (state.py) presents them
    as slices of the global [E, ...] tensors.
    """

    def __init__(self, experts: Experts, group: dist.ProcessGroup, grad_scale: float = 1.0):
        super().__init__()
        self.group, self.grad_scale = group, grad_scale
        self.ep, self.ep_rank = dist.get_world_size(group), dist.get_rank(group)
        self.num_experts = experts.gate_proj.shape[0]
        if self.num_experts % self.ep:
            raise ValueError(f"ep={self.ep} must divide the {self.num_experts} routed experts")
        self.num_local = self.num_experts // self.ep
        mine = slice(self.ep_rank * self.num_local, (self.ep_rank + 1) * self.num_local)
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, name, nn.Parameter(getattr(experts, name).detach()[mine].clone()))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [N, D], weights [N, K], indices [N, K] (global expert ids) -> [N, D]."""
        N, K = indices.shape
        order, counts = sort_by_expert(indices, self.num_experts)  # pairs grouped by expert, so by owner
        token = order // K
        # A pair's routing weight travels as an extra column of its hidden state: one exchange, and
        # the weight's gradient comes back through the same (differentiable) collective.
        gates = weights.flatten()[order].unsqueeze(-1).to(x.dtype)
        send = torch.cat([x[token], gates], dim=-1)  # [N*K, D+1], by owner then expert
        sent_per_expert = torch.tensor(counts, device=x.device)
        got_per_expert = torch.empty_like(sent_per_expert)  # [ep·P]: from source s, for my local expert p
        dist.all_to_all_single(got_per_expert, sent_per_expert, group=self.group)
        send_splits = sent_per_expert.view(self.ep, self.num_local).sum(1).tolist()
        got = got_per_expert.view(self.ep, self.num_local)  # [source, local expert]
        recv_splits = got.sum(1).tolist()
        recv = all_to_all_single_autograd(send, recv_splits, send_splits, self.group)  # [M, D+1], by source then local expert
        # Regroup by local expert (stable: within an expert, by source), run each expert once, undo.
        local_expert = torch.repeat_interleave(torch.arange(self.num_local, device=x.device).repeat(self.ep),
                                               got.flatten())
        by_expert = local_expert.argsort(stable=True)
        rows = recv[by_expert]
        weights = [ScaleGrad.apply(w, self.grad_scale) for w in (self.gate_proj, self.up_proj, self.down_proj)]
        out = expert_products(rows[:, :-1], rows[:, -1:], got.sum(0).tolist(), *weights)
        if not out.shape[0]:  # no rows for my experts: stay in the graph so that backward still runs both
            out = out + 0 * (rows.sum() + sum(w.sum() for w in weights))  # collectives, as the peers' does
        back = torch.empty_like(out).index_copy(0, by_expert, out)  # [M, D], by source again
        y = all_to_all_single_autograd(back, send_splits, recv_splits, self.group)  # [N*K, D], in `order`
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))
