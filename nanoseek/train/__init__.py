"""Training: pretraining and SFT with DeepSeek-V3's objectives, one shared loop.

    losses.py       cross-entropy, the MTP loss, the sequence-wise balance loss
    balance.py      aux-loss-free bias update, expert-load stats, router-collapse warning
    optim.py        AdamW parameter groups, warmup+cosine and warmup-stable-decay schedules
    state.py        checkpoints with optimizer/RNG/data state; exact resume
    loop.py         TrainConfig and the loop (accumulation, clipping, bf16, logs, plots)
    distributed.py  torchrun data parallelism, applied from outside the model
    pretrain.py     `nanoseek pretrain`     sft.py  `nanoseek sft`     evaluate.py  `nanoseek eval`
"""

from .loop import TrainConfig, train

__all__ = ["TrainConfig", "train"]
