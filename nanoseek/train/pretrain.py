"""Pretraining: next-token + multi-token-prediction from a preset or a checkpoint (command: cli/pretrain.py).

    from nanoseek.train.pretrain import PretrainConfig, pretrain
    out = pretrain(PretrainConfig(out="runs/pretrain", train=TrainConfig(steps=600)))

Build: a tokenizer trained on the data (or the checkpoint's), the model from the preset sized to
that vocabulary (or the checkpoint), documents tokenized as BOS + text + EOS and packed into
rows that never let attention or targets cross a document. Then the shared loop (loop.py).
Writes a stage folder: a Hugging Face checkpoint + tokenizer, train_state/, metrics.jsonl, PNGs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..hf.io import check_vocab, load_pretrained
from ..config import ModelConfig
from ..data import load_data, pack_chat, tokenize_documents
from ..data.tasks import TASKS
from .. import models
from ..model import Transformer
from ..tokenizer import Tokenizer
from .distributed import DistEnv, barrier, init_distributed
from .loop import TrainConfig, opt, train, with_indexers
from .state import refuse_existing_run


@dataclass
class PretrainConfig:
    """A pretraining run; `train` holds the loop's options."""

    out: str = opt(None, "stage folder to write (checkpoint, metrics.jsonl, plots)", required=True)
    data: str = opt("arithmetic", f"a built-in task ({', '.join(TASKS)}) or comma-separated .txt/.jsonl/.parquet paths")
    preset: str = opt("tiny", "model preset to build (see ModelConfig.preset)")
    model: str | None = opt(None, "continue from this checkpoint folder instead of a fresh preset model")
    seq_len: int = opt(256, "tokens per packed row")
    num_examples: int = opt(20000, "built-in tasks: training problems to generate")
    direct_fraction: float = opt(0.0, "built-in tasks: share of documents that state the result in one line "
                                      "instead of the worked steps (an R1-Zero base: mostly short answers, "
                                      "the worked form still known; see data.loaders.load_data)")
    vocab_size: int | None = opt(None, "vocabulary of the tokenizer trained on the data (default: the preset's)")
    resume: bool = opt(False, "continue the run in --out from its last checkpoint, exactly")
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if not self.out:
            raise ValueError("PretrainConfig.out: an output folder is required")
        if self.seq_len < 2:
            raise ValueError(f"PretrainConfig.seq_len={self.seq_len}: must be at least 2")
        if self.num_examples < 1:
            raise ValueError(f"PretrainConfig.num_examples={self.num_examples}: must be positive")
        if not 0.0 <= self.direct_fraction <= 1.0:
            raise ValueError(f"PretrainConfig.direct_fraction={self.direct_fraction}: must be in [0, 1]")
        if self.model is not None and not Path(self.model).is_dir():
            raise FileNotFoundError(f"PretrainConfig.model={self.model!r}: checkpoint folder not found")
        if self.preset is not None:
            ModelConfig.preset(self.preset)  # raises on an unknown name


def build_tokenizer(cfg: PretrainConfig, docs: list, env: DistEnv) -> Tokenizer:
    """The checkpoint's tokenizer, or one trained on the data (by rank 0; the others load its copy)."""
    if cfg.resume:
        return Tokenizer.from_pretrained(cfg.out)
    if cfg.model is not None:
        return Tokenizer.from_pretrained(cfg.model)
    out = Path(cfg.out)
    if env.is_main:
        vocab = cfg.vocab_size or ModelConfig.preset(cfg.preset).vocab_size
        texts = [d if isinstance(d, str) else "\n".join(m["content"] + "\n" + (m.get("reasoning_content") or "")
                                                       for m in d) for d in docs]
        Tokenizer.train(texts, vocab_size=vocab).save_pretrained(out)
    barrier(env)
    return Tokenizer.from_pretrained(out)


def build_model(cfg: PretrainConfig, tokenizer: Tokenizer) -> Transformer:
    """The model to train in fp32: from --out (resume), --model, or the preset at the tokenizer's vocabulary."""
    if cfg.resume:
        return load_pretrained(cfg.out, dtype=torch.float32)
    if cfg.model is not None:
        model = load_pretrained(cfg.model, dtype=torch.float32)
        check_vocab(tokenizer, model, cfg.model)
        return with_indexers(model, cfg.train)
    mcfg = ModelConfig.preset(cfg.preset).replace(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                                                  eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    torch.manual_seed(cfg.train.seed)
    return models.build_model(mcfg)


def pack(docs: list, tokenizer: Tokenizer, seq_len: int, verbose: bool = True):
    """BOS + text + EOS per document (chats through the chat template), packed into [R, seq_len] rows."""
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    rows = pack_chat(tokenize_documents(docs, tokenizer), seq_len, drop_long=False, pad_id=pad)
    if verbose:
        print(f"data: {rows.n_docs:,} documents -> {len(rows):,} rows of {seq_len} tokens "
              f"({rows.n_split} long documents split, {rows.n_pad:,} padding tokens)")
    return rows


def pretrain(cfg: PretrainConfig, env: DistEnv | None = None) -> Path:
    """Run (or resume) pretraining; returns the stage folder."""
    env = env or init_distributed()
    out = Path(cfg.out)
    if not cfg.resume:
        refuse_existing_run(out)  # before the data is loaded: fail fast
    docs = load_data(cfg.data, n=cfg.num_examples, split="train", seed=cfg.train.seed,
                     direct_fraction=cfg.direct_fraction)
    tokenizer = build_tokenizer(cfg, docs, env)
    model = build_model(cfg, tokenizer)
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    rows = pack(docs, tokenizer, cfg.seq_len, verbose=env.is_main)
    meta = {"source": {"data": cfg.data, "preset": None if cfg.model else cfg.preset, "model": cfg.model,
                       "seq_len": cfg.seq_len, "num_examples": cfg.num_examples,
                       "direct_fraction": cfg.direct_fraction}}
    return train(model, rows, cfg.train, out, tokenizer, stage="pretrain", meta=meta, resume=cfg.resume, env=env)
