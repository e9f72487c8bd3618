"""`nanoseek distill`: teach a smaller student the teacher's reasoning, as DeepSeek-R1 did.

    nanoseek distill --teacher runs/grpo --student tiny --dataset arithmetic --out runs/distill
    nanoseek distill --teacher runs/grpo --student tiny --dense --student-layers 2 --out runs/dense
    nanoseek distill --teacher runs/grpo --student runs/small --kl forward --kl-weight 1.0 --out runs/kd
    torchrun --nproc_per_node 2 -m nanoseek distill --teacher runs/grpo --out runs/distill-2p   # prompts split, FSDP2

Flags: DistillConfig's and TrainConfig's fields. The work: nanoseek.rl.distill.distill.
"""

from __future__ import annotations

from ..rl.distill import DistillConfig, distill
from ..train.loop import TrainConfig
from .flags import add_config_args, config_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("distill", help="distill a teacher's reasoning into a smaller student",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p, DistillConfig, skip=("train",))
    add_config_args(p, TrainConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    distill(config_from_args(DistillConfig, args, train=config_from_args(TrainConfig, args)))
    return 0
