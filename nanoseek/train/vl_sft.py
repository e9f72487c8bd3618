"""Supervised fine-tuning of a vision-language model on image-text conversations (command: cli/vl_sft.py).

    from nanoseek.train.vl_sft import VLSFTConfig, vl_sft
    report = vl_sft(VLSFTConfig(out="runs/vl", data="shapes", stage="all", steps=300))
    report["accuracy_before"], report["accuracy_after"], report["majority_baseline"]

Data: the built-in synthetic shapes task (``data/shapes.py``; a new tiny VL model and tokenizer are
made for it when no --model is given) or JSONL records ``{"messages": [...], "images": ["a.png"]}``
whose message texts mark each image's place with ``<image_placeholder>`` (images with no mark go
before the first user message's text). Only the final assistant message is trained on (its
tokens and the closing EOS); the prompt is rendered by the chat template with thinking off.

Stages, as DeepSeek-VL trains them: ``aligner`` (only the vision-language adaptor learns: stage 1,
towers and language model frozen), ``joint`` (adaptor + language model, towers frozen: stages 2-3)
and ``all`` (everything, as a model trained from scratch needs). This is its own short loop,
not the shared one in loop.py: rows carry images, and it runs one device with AdamW and a
constant rate after warmup (no data parallelism, no MTP loss, no resume).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..chat import chat_prompt
from ..config import ModelConfig
from ..hf.vl import load_vl_with_tokenizer, save_vl
from ..inference.engine import Engine
from ..tokenizer import Tokenizer
from ..vision.image import ImageProcessor, open_image
from ..vision.sam import SamConfig
from ..vision.siglip import SiglipConfig
from ..vision.vl import IMAGE_TOKEN, VLConfig, VLModel

STAGES = ("aligner", "joint", "all")


@dataclass
class VLSFTConfig:
    out: str                          # folder for the trained checkpoint, tokenizer and report.json
    model: str | None = None          # a DeepSeek-VL checkpoint; None: a new tiny model (shapes task)
    data: str = "shapes"              # "shapes" or a JSONL file of {"messages", "images"} records
    stage: str = "all"                # aligner | joint | all (see the module docstring)
    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 20
    n_train: int = 3000               # shapes examples to train on
    n_eval: int = 200                 # held-out shapes examples (another seed)
    seed: int = 0
    image_size: int = 64              # a new tiny model's SigLIP view (its SAM view is twice as large)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r}: expected one of {', '.join(STAGES)}")


def tiny_vl_config(tokenizer: Tokenizer, image_size: int = 32) -> VLConfig:
    """The demo's tiny hybrid model: SigLIP on image_size px in 8 px patches ((image_size/8)^2 tokens),
    SAM on twice that, a 2-layer Llama."""
    text = ModelConfig.family("llama", vocab_size=tokenizer.vocab_size + 1, hidden_size=96, intermediate_size=256,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                              max_position_embeddings=128, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    return VLConfig(text=text, vision=SiglipConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=image_size, patch_size=8),
                    high_res=SamConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=2 * image_size, patch_size=8, mlp_dim=64, window_size=4, global_attn_indexes=[1]),
                    image_token_id=tokenizer.vocab_size)  # one id past the tokenizer's: never typed


def set_stage(vl: VLModel, stage: str) -> list[torch.nn.Parameter]:
    """Freeze what `stage` keeps fixed; the parameters left to train."""
    for name, p in vl.named_parameters():
        if stage == "aligner":
            p.requires_grad_(name.startswith("model.aligner."))
        elif stage == "joint":
            p.requires_grad_(name.startswith(("model.aligner.", "language.")))
        else:
            p.requires_grad_(True)
    return [p for p in vl.parameters() if p.requires_grad]


def with_slots(messages: list[dict], n_images: int, slots: list[int]) -> list[dict]:
    """Messages whose <image_placeholder> marks (or the first user turn's start) hold each image's ids."""
    marked = sum(m["content"].count(IMAGE_TOKEN) for m in messages if isinstance(m.get("content"), str))
    out, first_user = [], True
    for m in messages:
        content = m.get("content")
        if isinstance(content, str) and marked:
            parts = content.split(IMAGE_TOKEN)
            pieces = [parts[0]] + [x for text in parts[1:] for x in (slots, text)]
            content = [p for p in pieces if p != ""]
        elif not marked and m["role"] == "user" and first_user and n_images:
            content, first_user = [slots] * n_images + [content], False
        out.append({**m, "content": content})
    if marked and marked != n_images:
        raise ValueError(f"{marked} {IMAGE_TOKEN} marks for {n_images} images")
    return out


def encode(tok: Tokenizer, vl: VLModel, messages: list[dict], n_images: int) -> tuple[list[int], list[int]]:
    """(ids, targets): the prompt up to the last assistant message, then its tokens and EOS (-100 elsewhere)."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a training record must end with an assistant message")
    slots = [vl.config.image_token_id] * vl.config.num_image_tokens
    prompt, _ = chat_prompt(tok, with_slots(messages[:-1], n_images, slots), thinking=False)
    answer = tok.encode_text(messages[-1]["content"]) + [tok.eos_id]
    return prompt + answer, [-100] * len(prompt) + answer


def read_jsonl(path: str) -> list[tuple[list[dict], list]]:
    """(messages, images) per record; image paths relative to the file's folder."""
    root, out = Path(path).parent, []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            rec = json.loads(line)
            if "messages" not in rec:
                raise ValueError(f"{path}:{n}: a record needs \"messages\"")
            out.append((rec["messages"], [open_image(root / p) for p in rec.get("images", [])]))
    return out


def shapes_records(n: int, seed: int) -> list[tuple[list[dict], list, str]]:
    from ..data.shapes import shape_examples
    return [([{"role": "user", "content": e.question}, {"role": "assistant", "content": e.answer}], [e.image], e.topic)
            for e in shape_examples(n, seed)]


def batch_tensors(rows, proc: ImageProcessor):
    """Pad ids/targets to the longest row; all the rows' images in row order."""
    T = max(len(ids) for ids, _, _ in rows)
    ids = torch.tensor([r[0] + [0] * (T - len(r[0])) for r in rows])
    targets = torch.tensor([r[1] + [-100] * (T - len(r[1])) for r in rows])
    images = [img for _, _, imgs in rows for img in imgs]
    low, high = proc(images) if images else (None, None)
    return ids, targets, low, high


def loss_on(vl: VLModel, ids, targets, low, high) -> torch.Tensor:
    logits = vl(ids, low, high)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten(), ignore_index=-100)


def answer_accuracy(vl: VLModel, tok: Tokenizer, records, max_new_tokens: int = 4) -> dict:
    """Greedy answers through the Engine (images at prefill), exact match after stripping: overall
    ("all") and per topic when the records carry one (the shapes task's colour / kind / count)."""
    engine = Engine(vl, tok)
    slots = engine.image_slots()
    prompts = [chat_prompt(tok, with_slots(m[:-1], len(imgs), slots), thinking=False)[0] for m, imgs, *_ in records]
    outs = engine.generate(prompts, max_new_tokens, images=[imgs for _, imgs, *_ in records])
    said = [tok.decode(o.tokens, skip_special_tokens=True).strip() for o in outs]
    right = [s == m[-1]["content"] for s, (m, *_) in zip(said, records)]
    topics = [r[2] if len(r) > 2 else "all" for r in records]
    acc = {t: sum(r for r, u in zip(right, topics) if u == t) / topics.count(t) for t in set(topics)}
    return {"all": sum(right) / len(right), **acc}


def vl_sft(cfg: VLSFTConfig, log=print) -> dict:
    """Train, save and report; see the module docstring. Long in statements, not in ideas: set-up,
    the loop, then evaluation and saving."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    shapes = cfg.data == "shapes"
    if shapes:
        train_recs = shapes_records(cfg.n_train, cfg.seed)
        eval_recs = shapes_records(cfg.n_eval, cfg.seed + 10_000)
    else:
        train_recs, eval_recs = read_jsonl(cfg.data), []
    if cfg.model:
        vl, tok = load_vl_with_tokenizer(cfg.model, dtype=torch.float32)
    else:
        from ..data.shapes import task_texts
        tok = Tokenizer.train(task_texts() * 4, vocab_size=320)
        vl = VLModel(tiny_vl_config(tok, cfg.image_size))
        vl.reset_parameters()
    proc = ImageProcessor.for_config(vl.config)
    rows = [(*encode(tok, vl, m, len(imgs)), imgs) for m, imgs, *_ in train_recs]
    report = {"stage": cfg.stage, "steps": cfg.steps, "train_examples": len(rows)}
    if shapes:
        from ..data.shapes import majority_baseline, shape_examples
        report["majority_baseline"] = majority_baseline(shape_examples(cfg.n_eval, cfg.seed + 10_000),
                                                        shape_examples(cfg.n_train, cfg.seed))
        report["accuracy_before"] = answer_accuracy(vl.eval(), tok, eval_recs)
    params = set_stage(vl, cfg.stage)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    vl.train()
    t0, losses = time.perf_counter(), []
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
        loss = loss_on(vl, *batch_tensors(rng.sample(rows, min(cfg.batch_size, len(rows))), proc))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.steps - 1:
            log(f"step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - t0:.0f}s")
    report["train_seconds"] = round(time.perf_counter() - t0, 1)
    report["loss_first"], report["loss_last"] = losses[0], sum(losses[-10:]) / len(losses[-10:])
    vl.eval()
    if shapes:
        report["accuracy_after"] = answer_accuracy(vl, tok, eval_recs)
    out = Path(cfg.out)
    save_vl(vl, out)
    tok.save_pretrained(out)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
