"""Held-out pass@1 of a checkpoint on the arithmetic task, split by operator and operand digits, at
DeepSeek-R1's sampling settings (temperature 0.6, top-p 0.95, pass@1 averaged over k samples): where
a GRPO run's gain or loss sits (BENCHMARKS.md, "Dynamic sampling").

    python benchmarks/rl_by_kind.py runs/demo/sft            # chat layout, k = 4, the demo's 200 test problems
    python benchmarks/rl_by_kind.py runs/demo/r1_zero text 4  # a base model: pretraining's text layout
"""

import collections
import sys

import torch

from nanoseek.data import get_task
from nanoseek.hf import load_pretrained
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.evaluate import evaluate_accuracy


def main(path: str, layout: str = "chat", k: int = 4, n: int = 200) -> None:
    examples = get_task("arithmetic").examples("test", n, seed=0)
    res = evaluate_accuracy(load_pretrained(path, dtype=torch.float32), Tokenizer.from_pretrained(path), "arithmetic",
                            max_new_tokens=160, layout=layout, k=k, temperature=0.6, top_p=0.95, seed=0,
                            examples=examples, progress=False)
    meta = {ex.prompt: ex.meta for ex in examples}
    right = collections.defaultdict(list)
    for s in res["samples"]:
        m = meta[s["prompt"]]
        right[m["op"]].append(s["correct"])
        right[f"{m['op']} {len(str(m['a']))}x{len(str(m['b']))} digits"].append(s["correct"])
    print(f"{path}: pass@1 {100 * res['pass@1']:.1f}% ± {100 * res['stderr']:.1f} (k = {k}), "
          f"mean response {res['mean_response_tokens']:.1f} tokens")
    for key in sorted(right):
        print(f"  {key}: {100 * sum(right[key]) / len(right[key]):.1f}% of {len(right[key])} samples")


if __name__ == "__main__":
    main(sys.argv[1], *(sys.argv[2:3]), *(int(x) for x in sys.argv[3:4]))
