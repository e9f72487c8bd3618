"""`nanoseek eval`: held-out accuracy (and loss, for a built-in task) on a task or any prompt dataset.

    nanoseek eval --model runs/sft --dataset arithmetic                       # greedy pass@1 + loss
    nanoseek eval --model runs/pretrain --dataset arithmetic --layout text    # pretraining's text layout
    nanoseek eval --model runs/sft --dataset countdown --samples 8 --temperature 0.6 --top-p 0.95  # R1: pass@1 over k, cons@k
    nanoseek eval --model runs/sft --dataset problems.jsonl --prompt-column question --answer-column solution

Flags: EvalConfig's fields. The work: nanoseek.train.evaluate.evaluate; this file prints its result.
"""

from __future__ import annotations

from ..train.evaluate import EvalConfig, evaluate
from .flags import add_config_args, config_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="held-out accuracy (pass@1 ± stderr, cons@k) on a built-in task or a prompt dataset",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p, EvalConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    res = evaluate(config_from_args(EvalConfig, args))
    k = res["k"]
    extra = f", pass@{k} {res[f'pass@{k}']:.1%}, cons@{k} {res[f'cons@{k}']:.1%}" if k > 1 else ""
    loss = f"held-out loss {res['loss']:.4f} (perplexity {res['perplexity']:.2f}), " if "loss" in res else ""
    print(f"{res['dataset']} ({res['config']['split']}), {res['n']} problems ({res['layout']} layout): {loss}"
          f"pass@1 {res['accuracy']:.1%} ± {res['stderr']:.1%} (standard error, k={k}){extra}; "
          f"{res['mean_response_tokens']:.0f} tokens per answer, {res['truncated']:.1%} truncated, "
          f"{res['unparsed']:.1%} without an <answer>")
    for s in res["samples"][:3]:
        print(f"--- {s['prompt']!r} expected {s['expected']!r}, got {s['answer']!r} "
              f"({'correct' if s['correct'] else 'wrong'})\n{s['completion']}")
    return 0
