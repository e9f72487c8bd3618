"""Per-request logits controls and log-probabilities over the rows of a ``Batch``.

    logits = controlled(rows, logits, eos)       # penalties, logit_bias, min_tokens, guides
    record_logprobs(rows, raw_logits, tokens)    # what each row asked for, of the chosen tokens

A row whose settings are all defaults is never touched, so default greedy decoding is the plain
argmax of the model's logits. The controls run in this order: repetition/presence/frequency
penalties (vectorised over the rows that have any), logit_bias, min_tokens (EOS masked until the
row has that many tokens), then the row's guide (a token mask: a grammar, a thinking budget).

Log-probabilities are the model's own: log-softmax of the raw logits, before penalties, bias,
guides, temperature and top-k/top-p/min-p (vLLM's default, "raw logprobs"). So they do not
depend on how a token was chosen, and a log-likelihood evaluation reads the model itself.
"""

from __future__ import annotations

import torch

from .sampling import penalize, top_logprobs


def needs_control(s) -> bool:
    """True when a row's token choice is more than its sampler's (a rule or a log-prob record).
    Such rows are not speculated: each of their tokens goes through ``controlled``."""
    p = s.params
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 or p.logit_bias
                or p.min_tokens or p.logprobs is not None or s.guide is not None)


def controlled(seqs, logits: torch.Tensor, eos: set[int]) -> torch.Tensor:
    """logits [n, V] with every running row's controls applied (fp32 copy), or `logits` itself
    when no row has any."""
    rows = [i for i, s in enumerate(seqs) if s.finish_reason is None and needs_control(s)]
    if not rows:
        return logits
    out, V = logits.float().clone(), logits.shape[-1]
    pen = [i for i in rows if seqs[i].params.presence_penalty or seqs[i].params.frequency_penalty
           or seqs[i].params.repetition_penalty != 1.0]
    if pen:
        out[pen] = penalize(out[pen], *_counts([seqs[i] for i in pen], V, out.device),
                            *(torch.tensor([getattr(seqs[i].params, k) for i in pen], device=out.device)
                              for k in ("presence_penalty", "frequency_penalty", "repetition_penalty")))
    for i in rows:
        s = seqs[i]
        if s.params.logit_bias:
            ids = [t for t in s.params.logit_bias if 0 <= t < V]
            out[i, ids] += torch.tensor([float(s.params.logit_bias[t]) for t in ids], device=out.device)
        if len(s.out) < s.params.min_tokens:
            out[i, [t for t in eos if t < V]] = float("-inf")
        if s.guide is not None:
            allowed = s.guide.allowed(V)
            if allowed is not None:
                out[i] = out[i].masked_fill(~allowed.to(out.device), float("-inf"))
    return out


def _counts(seqs, V: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(generated-token counts [n, V], seen in prompt or output [n, V]) for the penalties."""
    counts = torch.zeros(len(seqs), V, device=device)
    seen = torch.zeros(len(seqs), V, dtype=torch.bool, device=device)
    for r, s in enumerate(seqs):
        out = torch.tensor(s.out, dtype=torch.long, device=device)
        counts[r].index_add_(0, out, torch.ones(len(s.out), device=device))
        seen[r, torch.tensor(s.prompt, dtype=torch.long, device=device)] = True
    return counts, seen | (counts > 0)


def record_logprobs(seqs, logits: torch.Tensor, tokens: list[int]) -> None:
    """Append (token, log-prob, [(id, log-prob)] top-N) to each row that asked for log-probs."""
    idx = [i for i, s in enumerate(seqs) if s.params.logprobs is not None and tokens[i] >= 0]
    if not idx:
        return
    n = max(seqs[i].params.logprobs for i in idx)
    chosen = torch.tensor([tokens[i] for i in idx], device=logits.device)
    lp, top_ids, top_lp = top_logprobs(logits[idx], chosen, n)
    for j, i in enumerate(idx):
        k = seqs[i].params.logprobs
        seqs[i].logprobs.append((tokens[i], lp[j].item(), list(zip(top_ids[j, :k].tolist(), top_lp[j, :k].tolist()))))


def record_prompt_logprobs(s, logits: torch.Tensor, start: int = 0) -> None:
    """logits [n, V] at prompt positions start..start+n-1 (a prefill chunk) -> appended to
    s.prompt_logprobs: None for the first prompt token (nothing predicts it), then each next prompt
    token's (token, log-prob, top-N); a chunk's last position predicts a prompt token only if one follows."""
    k = s.params.prompt_logprobs
    if start == 0:
        s.prompt_logprobs = [None]
    targets = s.prompt[start + 1:start + 1 + logits.shape[0]]
    if not targets:
        return
    lp, top_ids, top_lp = top_logprobs(logits[:len(targets)], torch.tensor(targets, device=logits.device), k)
    s.prompt_logprobs += [(t, v, list(zip(i, p))) for t, v, i, p in
                          zip(targets, lp.tolist(), top_ids.tolist(), top_lp.tolist())]
