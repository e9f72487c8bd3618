"""CPU fast paths the model calls: decoding's small matrix products and the MoE token dispatch.

    y = linear(x, weight, bias)                      # F.linear; faster for 1-2 rows of fp32 on a CPU
    for e, tokens, pairs in group_by_expert(indices, n_experts):
        ...                                          # expert e runs on x[tokens], weights.flatten()[pairs]

Both are exact: `linear` sums in another order, `group_by_expert` only reorders work. The model
(``model.Experts``) and the quantized experts (``quant.modules``) dispatch tokens through the same
grouping, so a faster grouping lands in both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GEMV_BLOCKS = 4  # output-row blocks of a decoding product, one bmm (see `linear`)
GEMV_MIN_NUMEL = 1 << 18  # 1 MB of fp32: smaller weights stay in cache, where F.linear beats a bmm dispatch


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with a faster path for decoding's one- and two-row products on a CPU.

    For 1-2 rows torch runs a matrix-vector product that streams the weight from one core (measured
    on a 2-core AMD EPYC, fp32: 250 us for 1024x1024, ~15 GB/s; two rows take twice as long). Cut
    into GEMV_BLOCKS blocks of output rows, the same product is one bmm whose blocks run on every
    core: 92 us for one row, 131 us for two. Decoding is mostly these products, so this is most of
    its speed. Same sums in another order; the autograd, many-row and small-weight paths are F.linear.
    """
    rows, N = x.numel() // x.shape[-1], weight.shape[0]
    if (rows > 2 or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or weight.numel() < GEMV_MIN_NUMEL or N % GEMV_BLOCKS or not weight.is_contiguous()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return F.linear(x, weight, bias)
    K = x.shape[-1]
    x2 = x.reshape(rows, K)
    blocks = weight.view(GEMV_BLOCKS, N // GEMV_BLOCKS, K)
    y = torch.bmm(blocks, x2.t().expand(GEMV_BLOCKS, K, rows))  # [blocks, N / blocks, rows]
    y = y.permute(2, 0, 1).reshape(*x.shape[:-1], N)
    return y if bias is None else y + bias


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """silu(gate) * up. With `limit` (DeepSeek-V4's clipped SwiGLU) gate is first clipped from above
    and up to [-limit, limit], which bounds the activations of low-precision experts."""
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up


# ----------------------------------------------------------------------------- MoE dispatch

def sort_by_expert(indices: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, list[int]]:
    """indices [N, K] -> (order [N*K], counts [E]): the (token, expert) pair ids j (token j // K)
    sorted by expert, stably, and how many pairs each expert got; expert e's pairs are the e-th
    run of `order`. One sort for any N, so a caller can gather all tokens at once (training)."""
    flat = indices.flatten()
    return flat.argsort(stable=True), torch.bincount(flat, minlength=n_experts).tolist()


def group_by_expert(indices: torch.Tensor, n_experts: int):
    """Yield (expert e, token rows [n], pair rows [n]) for each expert some token chose, in pair order
    within an expert; pair j is token j // K's k-th choice (indices [N, K], weights.flatten()[j]).

    Decoding (N*K <= E pairs): grouped in Python from one small list, no sort; an expert chosen by
    a single token gets slices (no index tensors). Otherwise the pairs are sorted by expert once
    (``sort_by_expert``) and each expert gets a contiguous run of the order."""
    N, K = indices.shape
    if N * K <= n_experts:
        by_expert: dict[int, list[int]] = {}
        for j, e in enumerate(indices.flatten().tolist()):
            by_expert.setdefault(e, []).append(j)
        for e, pairs in by_expert.items():
            if len(pairs) == 1:
                j = pairs[0]
                yield e, slice(j // K, j // K + 1), slice(j, j + 1)
            else:
                p = torch.tensor(pairs, device=indices.device)
                yield e, p // K, p
        return
    order, counts = sort_by_expert(indices, n_experts)
    start = 0
    for e, n in enumerate(counts):
        if n:
            pairs = order[start:start + n]
            yield e, pairs // K, pairs
            start += n
