"""`nanoseek sft`: supervised fine-tuning on conversations, loss only on what the assistant wrote.

    nanoseek sft --model runs/pretrain --dataset arithmetic --steps 200 --out runs/sft
    nanoseek sft --model runs/pretrain --dataset chats.jsonl --steps 200 --out runs/sft
    nanoseek sft --model runs/pretrain --dataset arithmetic --steps 200 --out runs/sft --resume
    torchrun --nproc_per_node 2 -m nanoseek sft --model runs/pretrain --dataset arithmetic --out runs/sft-fsdp
    torchrun --nproc_per_node 4 -m nanoseek sft --model runs/pretrain --dataset arithmetic --ep 2 --out runs/sft-ep

Flags: SFTConfig's and TrainConfig's fields (SFT's shorter defaults). The work: nanoseek.train.sft.sft.
"""

from __future__ import annotations

from ..train.distributed import init_distributed, shutdown
from ..train.loop import TrainConfig
from ..train.sft import SFTConfig, default_sft_train, sft
from .flags import add_config_args, config_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on conversations (loss on the assistant's tokens)",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p, SFTConfig, skip=("train",))
    add_config_args(p, TrainConfig, defaults=default_sft_train())
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = config_from_args(SFTConfig, args, train=config_from_args(TrainConfig, args))
    env = init_distributed()
    try:
        sft(cfg, env)
    finally:
        shutdown(env)
    return 0
