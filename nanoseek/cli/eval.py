"""`nanoseek eval`: held-out loss and exact-match accuracy on a built-in task's test split.

    nanoseek eval --model runs/sft --data arithmetic                       # greedy pass@1 + loss
    nanoseek eval --model runs/pretrain --data arithmetic --layout text    # pretraining's text layout
    nanoseek eval --model runs/sft --data countdown --samples 8 --temperature 0.6 --top-p 0.95  # pass@k, maj@k

Flags: EvalConfig's fields. The work: nanoseek.train.evaluate.evaluate; this file prints its result.
"""

from __future__ import annotations

from ..train.evaluate import EvalConfig, evaluate
from .flags import add_config_args, config_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="held-out loss and exact-match accuracy on a built-in task's test split",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p, EvalConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    res = evaluate(config_from_args(EvalConfig, args))
    k = res["k"]
    extra = f", pass@{k} {res[f'pass@{k}']:.1%}, maj@{k} {res[f'maj@{k}']:.1%}" if k > 1 else ""
    print(f"{res['data']} test split, {res['n']} problems ({res['layout']} layout): held-out loss "
          f"{res['loss']:.4f} (perplexity {res['perplexity']:.2f}), pass@1 {res['accuracy']:.1%}{extra}; "
          f"{res['mean_response_tokens']:.0f} tokens per answer, {res['truncated']:.1%} truncated, "
          f"{res['unparsed']:.1%} without an <answer>")
    for s in res["samples"][:3]:
        print(f"--- {s['prompt']!r} expected {s['expected']!r}, got {s['answer']!r} "
              f"({'correct' if s['correct'] else 'wrong'})\n{s['completion']}")
    return 0
