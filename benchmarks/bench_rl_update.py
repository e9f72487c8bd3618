"""The GRPO update alone: one padded batch (TRL's layout) against micro-batches of like length.

One rollout (P prompts x G samples) from a GRPO checkpoint, then the trainer's side of a step, timed
for each micro-batch size: the frozen reference's forward (beta > 0) and the policy's forward,
backward and AdamW step (`nanoseek.rl.grpo.policy_update`). With micro-batch P x G the batch is one
forward padded to its longest row, as TRL's GRPOTrainer runs it; smaller micro-batches take the rows
sorted by length and cut each micro-batch after its longest row (`rollouts.length_batches`). The
sizes alternate over the rounds; the best round of each is printed.

    OMP_NUM_THREADS=1 python benchmarks/bench_rl_update.py runs/bench_rl_trl/sft --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanoseek.data.tasks import get_task  # noqa: E402
from nanoseek.hf import load_pretrained  # noqa: E402
from nanoseek.inference import Engine  # noqa: E402
from nanoseek.rl.grpo import Algorithm, GRPOConfig, policy_update  # noqa: E402
from nanoseek.rl.rollouts import length_batches, policy_logprobs, sample_groups, sequence_batch  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402
from nanoseek.train.optim import build_adamw  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a checkpoint folder (e.g. bench_rl.py --vs-trl's sft/)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--micro", type=int, nargs="+", default=[64, 16])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both forwards and the backward (GRPOConfig.bf16)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_pretrained(args.model, dtype=torch.float32), Tokenizer.from_pretrained(args.model)
    reference = copy.deepcopy(model).requires_grad_(False)
    examples = get_task("arithmetic").examples("train", args.prompts, seed=3)
    rollout = sample_groups(Engine(model, tok), tok, examples, args.group_size, args.max_new_tokens, 1.0, None, seed=1)
    batch = sequence_batch(rollout.prompts, rollout.completions, args.group_size, tok.pad_id)
    mask = batch[2]
    lengths = [len(c) for c in rollout.completions]
    print(f"{args.model}: {len(lengths)} completions, {statistics.mean(lengths):.1f} tokens on average "
          f"(min {min(lengths)}, max {max(lengths)}); padded batch {tuple(mask.shape)}, "
          f"{float(mask.sum()) / mask.numel():.0%} of its positions completion tokens; {torch.get_num_threads()} thread(s), "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}")
    advantages = torch.randn(len(lengths), generator=torch.Generator().manual_seed(0))
    times = {m: [] for m in args.micro}
    for _ in range(args.rounds):
        for micro in args.micro:
            cfg = GRPOConfig(model=args.model, out="unused", beta=0.04, micro_batch_size=micro, bf16=args.bf16)
            algo = Algorithm.from_config(cfg)
            policy = copy.deepcopy(model)
            optimizer = build_adamw(policy, cfg.lr, 0.0)
            t0 = time.perf_counter()
            ref_logp = policy_logprobs(reference, *batch, 1.0, micro, algo.precision)
            t1 = time.perf_counter()
            policy_update(policy, optimizer, batch, advantages, None, ref_logp, cfg, cfg.lr, algo)
            times[micro].append((t1 - t0, time.perf_counter() - t1))
    base = min(a + b for a, b in times[args.micro[0]])
    print("| micro-batch | positions computed | reference forward s | update s | total s | vs first |")
    print("|---|---|---|---|---|---|")
    for micro in args.micro:
        computed = sum(len(rows) * n for rows, n in length_batches(mask, micro))
        ref_s, upd_s = min(a for a, _ in times[micro]), min(b for _, b in times[micro])
        total = min(a + b for a, b in times[micro])
        print(f"| {micro} | {computed:,} | {ref_s:.3f} | {upd_s:.3f} | {total:.3f} | {base / total:.2f}x |")


if __name__ == "__main__":
    main()
