"""Training: pretraining and SFT with DeepSeek-V3's objectives, one shared loop.

    losses.py       cross-entropy, the MTP loss, the sequence-wise balance loss
    balance.py      aux-loss-free bias update, expert-load stats, router-collapse warning
    optim.py        AdamW parameter groups, warmup+cosine and warmup-stable-decay schedules
    step.py         the optimizer step (clip, finite check, lr, AdamW) and metrics log every loop shares
    batches.py      row order per step, per-document positions and attention masks, row checks
    flops.py        training FLOPs per token, the machine's matmul peak, MFU
    state.py        checkpoints with optimizer/RNG/data state; exact resume; a run's folder
    loop.py         TrainConfig and the loop (accumulation, bf16, balancing, logs, plots)
    distributed.py  the process group torchrun describes: rank, world, device, sums, shares, gathers
    parallelize.py  FSDP2, expert parallelism (expert_parallel.py), checkpointing, compile, FP8 from outside
    export.py       whole weights out of a sharded run one parameter at a time; its HF export, rank by rank
    pretrain.py     pretraining      sft.py  supervised fine-tuning      evaluate.py  held-out loss, pass@k
"""

from .loop import TrainConfig, train

__all__ = ["TrainConfig", "train"]
