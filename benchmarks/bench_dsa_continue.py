"""Continue-training a DeepSeek-V3-style model into a V3.2 (DSA) one, as DeepSeek did, and compare
held-out loss with the same model continued dense.

    python benchmarks/bench_dsa_continue.py                    # tiny preset, arithmetic, k = 8
    python benchmarks/bench_dsa_continue.py --base-steps 600 --stage-steps 200 --index-topk 16
    python benchmarks/bench_dsa_continue.py --warmup-steps 300 --stage-steps 200 --match-model-steps --index-topk 32

1. pretrain a tiny V3-style model (`nanoseek pretrain --preset tiny --data arithmetic`);
2. dense: continue it for warm-up + sparse steps as it is (--match-model-steps: for the sparse
   stage's steps only, the number of updates the whole DSA model gets: the warm-up trains the indexers alone);
3. sparse: add fresh lightning indexers choosing --index-topk tokens (`--indexer-stage warmup`:
   only the indexers learn, toward the dense attention), then `--indexer-stage sparse` (everything
   trains with top-k attention, the indexers on a detached input), the same total steps;
4. held-out loss of both on the task's test problems (`nanoseek eval`), whose documents are longer
   than k, so the sparse model really attends to only k earlier tokens. The issue's target: within
   2% of the dense model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanoseek.cli import main as cli
from nanoseek.train.evaluate import EvalConfig, evaluate


def run(args_list: list[str]) -> None:
    if cli(args_list + ["--no-progress"]) != 0:
        raise RuntimeError(f"nanoseek {' '.join(args_list)} failed")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-steps", type=int, default=400, help="pretraining steps of the V3-style base")
    ap.add_argument("--stage-steps", type=int, default=100, help="steps of each DSA stage (dense: twice this)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="indexer warm-up steps (default: --stage-steps)")
    ap.add_argument("--match-model-steps", action="store_true",
                    help="dense continues for the sparse stage's steps (not warm-up + sparse)")
    ap.add_argument("--index-topk", type=int, default=8, help="k: earlier tokens each query attends to")
    ap.add_argument("--seq-len", type=int, default=128, help="training rows' length")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    d = Path(args.out or tempfile.mkdtemp())
    common = ["--data", "arithmetic", "--seq-len", str(args.seq_len), "--batch-size", "16",
              "--micro-batch-size", "16"]
    t0 = time.perf_counter()
    run(["pretrain", "--preset", "tiny", "--out", str(d / "base"), "--steps", str(args.base_steps), *common])
    warmup = args.warmup_steps or args.stage_steps
    dense_steps = args.stage_steps if args.match_model_steps else warmup + args.stage_steps
    run(["pretrain", "--model", str(d / "base"), "--out", str(d / "dense"), "--steps", str(dense_steps),
         "--lr", "1e-3", *common])
    dsa = ["--index-topk", str(args.index_topk), "--index-n-heads", "4", "--index-head-dim", "32"]
    run(["pretrain", "--model", str(d / "base"), "--out", str(d / "warmup"), "--steps", str(warmup),
         "--indexer-stage", "warmup", "--lr", "1e-3", *dsa, *common])
    run(["pretrain", "--model", str(d / "warmup"), "--out", str(d / "sparse"), "--steps", str(args.stage_steps),
         "--indexer-stage", "sparse", "--lr", "1e-3", *common])
    losses = {}
    for name in ("base", "dense", "warmup", "sparse"):
        res = evaluate(EvalConfig(model=str(d / name), n=200, max_new_tokens=1, seq_len=args.seq_len), progress=False)
        losses[name] = res["loss"]
    print(f"tiny V3-style model on arithmetic, {args.base_steps} base steps, then dense {dense_steps} more, "
          f"or warm-up {warmup} + sparse {args.stage_steps} with k={args.index_topk} "
          f"({time.perf_counter() - t0:.0f} s, {args.threads} threads)")
    for name, loss in losses.items():
        print(f"  held-out loss {name:>7}: {loss:.4f}")
    gap = losses["sparse"] / losses["dense"] - 1
    print(f"  sparse vs dense: {gap:+.2%} (target: within 2%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
