"""`nanoseek pretrain`: next-token + multi-token-prediction pretraining from a preset or a checkpoint.

    nanoseek pretrain --preset tiny --data arithmetic --steps 600 --out runs/pretrain
    nanoseek pretrain --preset tiny --data arithmetic --steps 600 --out runs/pretrain --resume
    nanoseek pretrain --model runs/pretrain --data corpus.txt,more.jsonl --steps 200 --out runs/more
    torchrun --nproc_per_node 2 -m nanoseek pretrain --preset tiny --data arithmetic --steps 600 --out runs/fsdp
    torchrun --nproc_per_node 4 -m nanoseek pretrain --preset tiny --data arithmetic --ep 2 --dp-replicate 2 --out runs/hsdp-ep

Flags: PretrainConfig's and TrainConfig's fields. The work: nanoseek.train.pretrain.pretrain.
"""

from __future__ import annotations

from ..train.distributed import init_distributed, shutdown
from ..train.loop import TrainConfig
from ..train.pretrain import PretrainConfig, pretrain
from .flags import add_config_args, config_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model (next-token + MTP loss, aux-loss-free balancing)",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p, PretrainConfig, skip=("train",))
    add_config_args(p, TrainConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = config_from_args(PretrainConfig, args, train=config_from_args(TrainConfig, args))
    env = init_distributed()
    try:
        pretrain(cfg, env)
    finally:
        shutdown(env)
    return 0
