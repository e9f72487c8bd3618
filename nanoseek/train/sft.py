"""Supervised fine-tuning on conversations, loss only on what the assistant wrote (command: cli/sft.py).

    from nanoseek.train.sft import SFTConfig, sft
    out = sft(SFTConfig(model="runs/pretrain", out="runs/sft", train=TrainConfig(steps=200, lr=1e-3)))

The data are conversations: a built-in task's worked problems (the reasoning goes into the
assistant's reasoning_content, so the chat template renders it inside <think>...</think> as
DeepSeek-R1 answers), or JSONL/Parquet files and `datasets` folders with a "messages" list or "prompt"/"completion" fields
per record. Each one is
rendered with the tokenizer's chat template (Tokenizer.encode_chat), and only the tokens the
assistant wrote — reasoning, </think>, answer, the closing EOS — are targets; the template's
own tokens and the user's turns are never trained on. Conversations are packed whole (a cut
one would lose its prompt): one longer than --seq-len is left out and counted, as is one with
no assistant turn. Then the shared loop (loop.py) with the model's own tokenizer, from any
nanoseek or Hugging Face DeepSeek checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..hf.io import load_with_tokenizer
from ..data import load_data, pack_chat
from ..data.tasks import TASKS
from ..model import Transformer
from ..tokenizer import Tokenizer
from .distributed import DistEnv, init_distributed
from .loop import TrainConfig, opt, train, with_indexers
from .state import refuse_existing_run


def default_sft_train() -> TrainConfig:
    """SFT's usual loop settings: shorter, a lower peak rate than pretraining, a short warmup."""
    return TrainConfig(steps=200, batch_size=16, micro_batch_size=8, lr=1e-3, warmup_steps=10)


@dataclass
class SFTConfig:
    """A fine-tuning run; `train` holds the loop's options."""

    out: str = opt(None, "stage folder to write (checkpoint, metrics.jsonl, plots)", required=True)
    model: str = opt(None, "checkpoint folder to fine-tune (nanoseek or Hugging Face DeepSeek, with its "
                           "tokenizer)", required=True)
    dataset: str = opt("arithmetic", f"a built-in task ({', '.join(TASKS)}) or comma-separated .jsonl/.parquet "
                                     "files or datasets folders of {\"messages\": [...]} or {\"prompt\", \"completion\"} records")
    seq_len: int = opt(512, "tokens per packed row; longer conversations are left out (counted)")
    num_examples: int = opt(5000, "built-in tasks: training conversations to generate")
    data_seed: int = opt(1, "built-in tasks: seed of the generated problems (pretraining draws with the run "
                            "seed, so a different one gives SFT new problems)")
    resume: bool = opt(False, "continue the run in --out from its last checkpoint, exactly")
    train: TrainConfig = field(default_factory=default_sft_train)

    def __post_init__(self):
        if not self.out:
            raise ValueError("SFTConfig.out: an output folder is required")
        if not self.model:
            raise ValueError("SFTConfig.model: a checkpoint folder to fine-tune is required")
        if not self.resume and not Path(self.model).is_dir():
            raise FileNotFoundError(f"SFTConfig.model={self.model!r}: checkpoint folder not found")
        if self.seq_len < 2:
            raise ValueError(f"SFTConfig.seq_len={self.seq_len}: must be at least 2")
        if self.num_examples < 1:
            raise ValueError(f"SFTConfig.num_examples={self.num_examples}: must be positive")


def load_conversations(data: str, n: int, seed: int) -> list[list[dict]]:
    """Conversations from a built-in task (n worked problems) or files; plain-text records are an error
    (SFT needs to know which tokens the assistant wrote; pretrain on text instead)."""
    docs = load_data(data, n=n, split="train", seed=seed, chat=True)
    text = [i for i, d in enumerate(docs) if isinstance(d, str)]
    if text:
        raise ValueError(f"{data}: {len(text)} of {len(docs)} records are plain text (the first is record "
                         f"{text[0]}); SFT needs \"messages\" conversations — use `nanoseek pretrain` for text")
    return docs


def pack_conversations(conversations: list[list[dict]], tokenizer: Tokenizer, seq_len: int, verbose: bool = True):
    """encode_chat each conversation (ids + assistant mask) and pack them whole into [R, seq_len] rows.

    Left out and counted: conversations longer than seq_len, and ones with no assistant token.
    Raises when nothing is left to train on.
    """
    encoded = [tokenizer.encode_chat(c) for c in conversations]
    usable = [(ids, mask) for ids, mask in encoded if any(mask)]
    no_answer = len(encoded) - len(usable)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    rows = pack_chat(usable, seq_len, drop_long=True, pad_id=pad)
    if verbose:
        print(f"data: {len(encoded):,} conversations -> {len(rows):,} rows of {seq_len} tokens; left out: "
              f"{rows.n_dropped:,} longer than {seq_len} tokens, {no_answer:,} without an assistant turn; "
              f"{int(rows.loss_mask.sum()):,} assistant tokens trained on, {rows.n_pad:,} padding tokens")
    if len(rows) == 0:
        longest = max((len(ids) for ids, _ in usable), default=0)
        raise ValueError(f"no conversation to train on: {rows.n_dropped} of {len(encoded)} are longer than "
                         f"seq_len={seq_len} (the longest has {longest} tokens) and {no_answer} have no "
                         "assistant turn; raise --seq-len")
    return rows


def load_model(cfg: SFTConfig) -> tuple[Transformer, Tokenizer]:
    """The model in fp32 and its tokenizer: from --out when resuming, else from --model."""
    path = Path(cfg.out if cfg.resume else cfg.model)
    model, tokenizer = load_with_tokenizer(path, dtype=torch.float32)
    return with_indexers(model, cfg.train), tokenizer


def sft(cfg: SFTConfig, env: DistEnv | None = None) -> Path:
    """Run (or resume) supervised fine-tuning; returns the stage folder."""
    env = env or init_distributed()
    out = Path(cfg.out)
    if not cfg.resume:
        refuse_existing_run(out)  # before the data is loaded: fail fast
    model, tokenizer = load_model(cfg)
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    conversations = load_conversations(cfg.dataset, cfg.num_examples, cfg.data_seed)
    rows = pack_conversations(conversations, tokenizer, cfg.seq_len, verbose=env.is_main)
    meta = {"source": {"model": cfg.model, "dataset": cfg.dataset, "seq_len": cfg.seq_len,
                       "num_examples": cfg.num_examples, "data_seed": cfg.data_seed},
            "data_counts": {"conversations": len(conversations), "rows": len(rows),
                            "dropped_long": rows.n_dropped}}
    return train(model, rows, cfg.train, out, tokenizer, stage="sft", meta=meta, resume=cfg.resume, env=env)
