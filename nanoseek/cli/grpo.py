"""`nanoseek grpo`: reinforcement learning with Group Relative Policy Optimization.

    nanoseek grpo --model runs/sft --dataset arithmetic --out runs/grpo                # R1: SFT, then RL
    nanoseek grpo --model runs/pretrain --dataset countdown --out runs/zero            # R1-Zero: RL from a base
    nanoseek grpo --model runs/sft --dataset arithmetic --out runs/grpo --loss-type dapo --beta 0 --eps-high 0.28 \
        --dynamic-sampling                        # DAPO: only groups whose rewards differ are trained on
    nanoseek grpo --model runs/sft --dataset math.parquet --prompt-column problem --answer-column solution \
        --reward math format=0.1 --importance-sampling sequence --lora-rank 16 --bf16 --out runs/gspo
    torchrun --nproc_per_node 2 -m nanoseek grpo --model runs/sft --dataset arithmetic --out runs/grpo-2p
    torchrun --nproc_per_node 8 -m nanoseek grpo --model runs/sft --dataset arithmetic --ep 8 --out runs/grpo-ep  # FSDP2 + EP
    nanoseek grpo --model runs/sft --dataset arithmetic --out runs/grpo --reward accuracy format=0.1 my.mod:fn=0.5

Flags: GRPOConfig's fields. The work: nanoseek.rl.grpo.grpo.
"""

from __future__ import annotations

from ..rl.grpo import GRPOConfig, grpo
from .flags import add_config_args, config_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("grpo", help="reinforcement learning with GRPO and rule-based rewards",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p, GRPOConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    grpo(config_from_args(GRPOConfig, args))
    return 0
