"""The demo's sizes: DemoConfig, the full run (about 14 minutes on 2 idle cores, within a 20-minute
budget) and the --quick one.

    cfg = DemoConfig.quick(task="countdown")       # or DemoConfig.full(); fields are the stages' sizes
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..data.tasks import TASKS


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run. `quick()` shrinks every stage; `full()` is the whole run (about 14 minutes
    on 2 idle cores)."""

    task: str = "arithmetic"  # built-in task (nanoseek.data.tasks): corpus, prompts and checker
    seed: int = 0
    # pretraining the tiny DeepSeek-V3-style teacher
    pretrain_examples: int = 20000
    pretrain_steps: int = 700
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    # SFT with <think> reasoning: a short cold start, as DeepSeek-R1's (a few thousand examples before
    # RL): 20 steps of 16 rows, ~700 conversations. It leaves the model solving many problems only
    # sometimes, where GRPO's groups carry signal; from a 150-step SFT (51% pass@1) no GRPO setting
    # tried gained more than 2.4 points (BENCHMARKS.md, "The demo's RL gain")
    sft_examples: int = 4000
    sft_steps: int = 20
    # GRPO: 100 steps at lr 5e-5 gained 13 points over the 20-step cold start (150 steps: 14; lr 1e-4: 11)
    grpo_steps: int = 100
    grpo_lr: float = 5e-5
    grpo_beta: float = 0.0  # no KL reference (DAPO): each step saves the reference forward
    grpo_prompts: int = 8  # prompts per step
    grpo_group: int = 8  # samples per prompt (G)
    grpo_eval_samples: int = 4  # k: held-out samples per problem at R1's settings, start and end of GRPO
    grpo_dynamic_sampling: bool = True  # DAPO: drop groups with equal rewards, roll out fresh prompts instead
    grpo_max_resample_rounds: int = 4  # dynamic sampling's bound on extra rounds per step
    max_new_tokens: int = 160
    # R1-Zero: GRPO from the pretrained base with the accuracy + format reward
    r1_zero_steps: int = 60
    # R1-Zero's base: the pretrained model pretrained further on a corpus where this share of the
    # documents states the result in one line, without the worked steps (data.loaders.load_data), so
    # it mostly answers short and RL has longer, more accurate reasoning to find
    r1_zero_direct_fraction: float = 0.75
    r1_zero_base_steps: int = 150
    r1_zero_lr: float = 3e-5
    # evaluation on the held-out split (greedy pass@1)
    eval_examples: int = 200
    # the smaller student: distilled from the teacher vs trained by GRPO alone
    student_pretrain_steps: int = 400
    distill_prompts: int = 1000
    distill_steps: int = 150
    student_grpo_steps: int = 40
    # inference benchmarks
    bench_prompts: int = 8
    bench_tokens: int = 128
    bench_repeats: int = 3  # timed rounds (medians), the variants compared interleaved
    samples: int = 4
    # vision: a tiny DeepSeek-VL-style model on the synthetic shapes task
    vl_steps: int = 1500
    vl_train_examples: int = 3000
    vl_eval_examples: int = 200

    @classmethod
    def full(cls, **changes) -> "DemoConfig":
        return cls(**changes)

    @classmethod
    def quick(cls, **changes) -> "DemoConfig":
        return dataclasses.replace(cls(
            pretrain_examples=2000, pretrain_steps=30, batch_size=8, sft_examples=200, sft_steps=6, grpo_steps=2,
            r1_zero_steps=2, r1_zero_base_steps=4, grpo_prompts=2, grpo_max_resample_rounds=1, grpo_group=4, max_new_tokens=96, eval_examples=8,
            student_pretrain_steps=10, distill_prompts=8, distill_steps=4, bench_prompts=1, bench_tokens=24,
            bench_repeats=2, samples=2, vl_steps=4, vl_train_examples=40, vl_eval_examples=8),
            **changes)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"DemoConfig.task={self.task!r}: expected one of {', '.join(TASKS)}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0 \
                    and f.name not in ("seed", "r1_zero_direct_fraction", "grpo_beta"):
                raise ValueError(f"DemoConfig.{f.name}={v}: must be positive")
        if self.grpo_beta < 0:
            raise ValueError(f"DemoConfig.grpo_beta={self.grpo_beta}: must be >= 0")
        if not 0.0 <= self.r1_zero_direct_fraction <= 1.0:
            raise ValueError(f"DemoConfig.r1_zero_direct_fraction={self.r1_zero_direct_fraction}: must be in [0, 1]")
