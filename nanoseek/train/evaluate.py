"""Held-out loss and exact-match accuracy on a built-in task's test split (command: cli/eval.py).

    from nanoseek.train.evaluate import evaluate_accuracy, evaluate_loss
    res = evaluate_accuracy(model, tokenizer, "arithmetic", n=200, max_new_tokens=160)
    res["accuracy"], res["n"], res["samples"][0]      # {"prompt", "completion", "answer", "expected", "correct"}

Accuracy: each test problem is asked through the inference engine (batched, greedy unless a
temperature is given) in one of two prompt layouts (nanoseek.data.prompts): "chat" (the chat
template's user turn and generation prompt, ending in <think>: what SFT and GRPO train) or "text"
(``{prompt}\\n<think>\\n``, the layout of Example.text that pretraining trains). The answer is the
completion's last <answer>...</answer> (data.extract_answer) and the task checks it. With k samples
per problem (DeepSeek-R1's evaluation: temperature 0.6, top-p 0.95): pass@1 is the mean correctness
of all samples, pass@k whether any of a problem's k is correct, maj@k whether its most common
answer is.

Loss: next-token cross-entropy of the test split's worked solutions in the same layout (in chat
layout, only the assistant's tokens count, as in SFT), and its perplexity.
"""

from __future__ import annotations

import collections
import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..hf.io import load_with_tokenizer
from ..data import Example, extract_answer, get_task, pack_chat, tokenize_documents
from ..data.answers import check_answer
from ..data.prompts import LAYOUTS, checkpoint_layout, prompt_ids, task_from_spec
from ..data.records import is_builtin, load_examples
from ..data.tasks import TASKS, Task
from ..inference import Engine
from ..hf.fsutil import atomic_write_text
from ..tokenizer import Tokenizer
from ..device import resolve_device
from .distributed import default_device
from .batches import attention_mask, document_positions
from .loop import opt
from .losses import cross_entropy

def _as_task(task: str | Task | None) -> Task | None:
    return get_task(task) if isinstance(task, str) else task


def _checker(task: Task | None):
    """check(answer, example): the task's own, or data.answers.check_answer (task in meta, else the
    reference answer: exact, numeric or math-verify)."""
    return task.check if task is not None else check_answer


@torch.no_grad()
def evaluate_accuracy(model, tokenizer: Tokenizer, task: str | Task | None = "arithmetic", n: int = 200,
                      max_new_tokens: int = 256, layout: str = "chat", k: int = 1, temperature: float = 0.0,
                      top_p: float | None = None, batch_size: int = 32, seed: int = 0,
                      examples: list[Example] | None = None, progress: bool = True,
                      desc: str = "eval") -> dict:
    """Exact-match accuracy on `n` test problems of `task` (or on `examples`; task None checks each
    with data.answers.check_answer), through the engine.

    Returns {"accuracy" (= pass@1, the mean over problems of the fraction of its k samples that
    are right), "pass@1", "stderr" (its standard error over problems), "n", "correct", "k", and with
    k > 1 "pass@k", "cons@k" (= "maj@k": the most common answer is right), "mean_response_tokens",
    "truncated" and "unparsed" (fractions of all samples),
    "samples": one dict per sample {"prompt", "completion", "answer", "expected", "correct", "finish"}}.
    """
    task = _as_task(task)
    if k < 1:
        raise ValueError(f"k={k}: must be at least 1")
    if k > 1 and temperature <= 0:
        raise ValueError(f"k={k} samples per problem need temperature > 0 (greedy gives k identical answers)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    examples = examples if examples is not None else task.examples("test", n, seed=seed)
    if not examples:
        raise ValueError("no examples to evaluate")
    check = _checker(task)
    engine = Engine(model, tokenizer)
    per_batch = max(1, batch_size // k)
    samples, per_problem = [], []
    bar = tqdm(total=len(examples), desc=desc, unit="problem", dynamic_ncols=True, disable=not progress)
    for a in range(0, len(examples), per_batch):
        chunk = examples[a:a + per_batch]
        prompts = [prompt_ids(tokenizer, ex, layout) for ex in chunk for _ in range(k)]
        outs = engine.generate(prompts, max_new_tokens, temperature=temperature,
                               top_p=top_p if temperature > 0 else None, seed=seed + a)
        for j, ex in enumerate(chunk):
            mine = []
            for i in range(j * k, (j + 1) * k):
                completion = tokenizer.decode(outs[i].tokens)
                answer = extract_answer(completion)
                mine.append({"prompt": ex.prompt, "completion": completion, "answer": answer,
                             "expected": ex.answer, "correct": bool(check(answer, ex)),
                             "finish": outs[i].finish_reason, "tokens": len(outs[i].tokens)})
            samples += mine
            per_problem.append(mine)
        bar.update(len(chunk))
    bar.close()
    result = {"accuracy": _mean(s["correct"] for s in samples), "n": len(examples), "k": k,
              "correct": sum(s["correct"] for s in samples), "layout": layout}
    result["pass@1"] = result["accuracy"]
    result["stderr"] = _standard_error([_mean(s["correct"] for s in group) for group in per_problem])
    if k > 1:
        result[f"pass@{k}"] = _mean(any(s["correct"] for s in group) for group in per_problem)
        result[f"cons@{k}"] = result[f"maj@{k}"] = _mean(_majority_correct(check, group, ex)
                                                         for group, ex in zip(per_problem, examples))
    result.update(mean_response_tokens=statistics.mean(s["tokens"] for s in samples),
                  truncated=_mean(s["finish"] == "length" for s in samples),
                  unparsed=_mean(s["answer"] is None for s in samples), samples=samples)
    return result


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _standard_error(per_problem: list[float]) -> float:
    """Standard error of the mean over problems (each problem's pass rate over its k samples)."""
    n = len(per_problem)
    return statistics.stdev(per_problem) / math.sqrt(n) if n > 1 else 0.0


def _majority_correct(check, group: list[dict], example: Example) -> bool:
    votes = collections.Counter(s["answer"] for s in group if s["answer"] is not None)
    return bool(votes) and bool(check(votes.most_common(1)[0][0], example))


@torch.no_grad()
def evaluate_loss(model, tokenizer: Tokenizer, task: str | Task = "arithmetic", n: int = 200, layout: str = "chat",
                  seq_len: int = 512, batch_size: int = 8, seed: int = 0,
                  examples: list[Example] | None = None) -> dict:
    """Next-token loss of the test split's worked solutions: {"loss", "perplexity", "tokens", "n"}.

    Documents are packed whole (as in training; a longer one is split into seq_len pieces).
    """
    task = _as_task(task)
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
    examples = examples if examples is not None else task.examples("test", n, seed=seed)
    docs = [ex.messages() if layout == "chat" else ex.text() for ex in examples]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    rows = pack_chat(tokenize_documents(docs, tokenizer), seq_len, drop_long=False, pad_id=pad)
    was_training = model.training
    model.eval()
    device = model.model.embed_tokens.weight.device
    total, count = 0.0, 0
    for a in range(0, len(rows), batch_size):
        ids, doc_ids, targets = (getattr(rows, name)[a:a + batch_size].to(device)
                                 for name in ("input_ids", "doc_ids", "targets"))
        logits = model(ids, positions=document_positions(doc_ids), mask=attention_mask(doc_ids))
        scored = int((targets != -100).sum())
        total += float(cross_entropy(logits, targets, num_tokens=1))  # a sum: normalised below
        count += scored
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count, "n": len(examples)}


# ----------------------------------------------------------------------------- one checkpoint

@dataclass
class EvalConfig:
    """An evaluation of one checkpoint on a built-in task's test split or any prompt dataset."""

    model: str = opt(None, "checkpoint folder (with its tokenizer)", required=True)
    device: str = opt(None, "cpu, cuda or cuda:N (default: cuda when there is one)")
    dataset: str = opt("arithmetic", f"a built-in task ({', '.join(TASKS)}) or a .jsonl/.parquet file, datasets "
                                     "save_to_disk folder or folder of local data files")
    split: str = opt("test", "split of --dataset")
    prompt_column: str = opt("prompt", "column with the prompt (text or chat messages)")
    answer_column: str = opt("answer", "column with the reference answer")
    n: int = opt(200, "test problems")
    layout: str = opt("auto", "prompt layout: chat template, pretraining's text layout, or auto (text for a "
                              "pretraining checkpoint, else chat)", choices=("auto",) + LAYOUTS)
    max_new_tokens: int = opt(256, "longest completion")
    samples: int = opt(1, "k: samples per problem; pass@1 is averaged over them, with k > 1 also pass@k and cons@k "
                          "(R1: --samples 16 --temperature 0.6 --top-p 0.95)")
    temperature: float = opt(0.0, "0 = greedy (DeepSeek-R1 samples at 0.6)")
    top_p: float | None = opt(None, "nucleus sampling (DeepSeek-R1: 0.95)")
    batch_size: int = opt(32, "sequences generated together")
    seq_len: int = opt(512, "rows for the held-out loss")
    seed: int = opt(0, "seed of the test problems and of sampling")
    out: str | None = opt(None, "also write the result (samples included) to this JSON file")

    def __post_init__(self):
        if not self.model or not Path(self.model).is_dir():
            raise FileNotFoundError(f"EvalConfig.model={self.model!r}: checkpoint folder not found")
        if not is_builtin(self.dataset) and not Path(self.dataset).exists():
            raise ValueError(f"EvalConfig.dataset={self.dataset!r}: neither a built-in task ({', '.join(TASKS)}) "
                             "nor an existing path")
        for name in ("n", "max_new_tokens", "samples", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name}={getattr(self, name)}: must be positive")


def evaluate(cfg: EvalConfig, progress: bool = True) -> dict:
    """Load the checkpoint and return {"loss", "perplexity", "accuracy", ...} (evaluate_accuracy's keys);
    the held-out loss only for a built-in task (its worked solutions are the reference text)."""
    device = default_device() if cfg.device is None else resolve_device(cfg.device)
    model, tokenizer = load_with_tokenizer(cfg.model, dtype=torch.float32, device=device)
    layout = checkpoint_layout(cfg.model) if cfg.layout == "auto" else cfg.layout
    task = task_from_spec(cfg.dataset) if is_builtin(cfg.dataset) else None
    examples = load_examples(cfg.dataset, cfg.split, cfg.prompt_column, cfg.answer_column, n=cfg.n, seed=cfg.seed)
    loss = evaluate_loss(model, tokenizer, task, layout=layout, seq_len=cfg.seq_len, examples=examples) \
        if task is not None else {}
    acc = evaluate_accuracy(model, tokenizer, task, max_new_tokens=cfg.max_new_tokens, layout=layout,
                            k=cfg.samples, temperature=cfg.temperature, top_p=cfg.top_p,
                            batch_size=cfg.batch_size, seed=cfg.seed, examples=examples, progress=progress)
    result = {"model": cfg.model, "dataset": cfg.dataset, **{k: v for k, v in loss.items() if k != "n"}, **acc,
              "config": asdict(cfg)}
    if cfg.out:
        atomic_write_text(cfg.out, json.dumps(result, indent=1))
    return result
