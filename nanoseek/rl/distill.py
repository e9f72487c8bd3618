"""Distillation: teach a smaller student the teacher's reasoning, as DeepSeek-R1 did
(command: cli/distill.py).

    from nanoseek.rl.distill import DistillConfig, distill
    distill(DistillConfig(teacher="runs/grpo", out="runs/distill", train=TrainConfig(steps=300, batch_size=16)))

(a) R1-style (the default): the teacher samples `samples_per_prompt` reasoning traces for each
training prompt (R1's temperature 0.6, top-p 0.95); only traces whose answer is correct and whose
format is right are kept (rejection sampling), at most `traces_per_prompt` distinct ones per
prompt; the student is fine-tuned on them with nanoseek.train's loop, exactly like SFT (loss on
the assistant's tokens only). traces.jsonl keeps them, one conversation per line.
(b) --kl forward|reverse: logit distillation on the same traces, loss = CE + kl_weight * KL
between the teacher's and the student's next-token distributions at every assistant token. It
needs the teacher and student to share a tokenizer (the student is built on the teacher's).

The student is a preset (default `tiny`, resized with --student-hidden-size/--student-layers,
--dense for a dense model) or a checkpoint folder. Held-out pass@1 of the student (R1's temperature 0.6, top-p 0.95) is
measured before and after and written to distill.json.

Several processes (torchrun): every process holds the whole teacher (it is not trained) and
samples a contiguous share of the prompts (distributed.share, as GRPO splits its rollouts); every
sample has a seed of its own from its prompt's index (rollouts.row_seeds), so the traces do not
depend on the split, and they are gathered in rank order: every process then holds the list one
process would have made. The student trains parallelized like any run (FSDP2 by default, --ep,
--no-fsdp): through the training loop, or logit distillation's own loop over the same layout.
Process 0 evaluates, reading the student back from its checkpoint, and writes the files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..hf.io import load_pretrained, load_with_tokenizer
from ..config import ModelConfig, is_spec
from ..data.prompts import render_prompt, task_from_spec
from ..data.tasks import TASKS
from ..inference import Engine
from ..hf.fsutil import atomic_write_text
from ..model import Transformer
from ..models import build_model
from ..tokenizer import Tokenizer
from ..device import resolve_device
from ..train.batches import RowSampler, attention_mask, document_positions
from ..train.distributed import DistEnv, all_gather_objects, all_reduce_sum, barrier, init_distributed, share, shutdown
from ..train.loop import TrainConfig, layout_of, opt, train
from ..train.evaluate import evaluate_accuracy
from ..train.losses import IGNORE, cross_entropy
from ..train.optim import build_adamw
from ..train.sft import pack_conversations
from ..train.parallelize import ModelForward, clip_grad_norm, parallelize
from ..train.state import refuse_existing_run, save_run_checkpoint, start_fresh
from ..train.step import MetricsLog, optimizer_step
from .losses import forward_kl, reverse_kl
from ..data.answers import is_correct
from ..data.records import is_builtin, train_and_held_out
from .rewards import is_well_formatted
from .rollouts import row_seeds

KL = {"forward": forward_kl, "reverse": reverse_kl}


@dataclass
class DistillConfig:
    """A distillation run; `train` holds the loop's options (steps, lr, batch size...)."""

    teacher: str = opt(None, "teacher checkpoint folder (with its tokenizer)", required=True)
    device: str = opt(None, "cpu, cuda or cuda:N for the teacher's rollouts and the student's training (default: cpu)")
    out: str = opt(None, "run folder to write (student checkpoint, traces.jsonl, distill.json)", required=True)
    student: str = opt("tiny", "student: a preset, a family spec (qwen2:hidden=256,layers=4,heads=4,kv_heads=2,"
                                "inter=768: a standard Qwen2 checkpoint) or a checkpoint folder")
    dataset: str = opt("arithmetic", f"prompts: a built-in task ({', '.join(TASKS)}; name:key=value,...), a "
                                     ".jsonl/.parquet file or a datasets folder")
    split: str = opt("train", "split of --dataset the teacher answers")
    prompt_column: str = opt("prompt", "column with the prompt (text or chat messages)")
    answer_column: str = opt("answer", "column with the reference answer (rejection sampling keeps correct traces)")
    eval_dataset: str | None = opt(None, "held-out prompts (default: --dataset's test split, else its last "
                                         "--eval-size records)")
    student_hidden_size: int | None = opt(None, "preset student: hidden size (and MLA/MoE widths scaled with it)")
    student_layers: int | None = opt(None, "preset student: number of layers")
    dense: bool = opt(False, "preset student: dense SwiGLU MLPs instead of MoE")
    num_prompts: int = opt(1000, "training prompts the teacher answers")
    samples_per_prompt: int = opt(4, "teacher samples per prompt (rejection sampling keeps the correct ones)")
    traces_per_prompt: int = opt(1, "most distinct correct traces kept per prompt")
    max_new_tokens: int = opt(256, "teacher generation budget")
    temperature: float = opt(0.6, "teacher sampling temperature (R1's)")
    top_p: float = opt(0.95, "teacher nucleus sampling (R1's)")
    batch_size_generate: int = opt(64, "sequences per teacher generate call")
    seq_len: int = opt(512, "tokens per packed training row")
    kl: str | None = opt(None, "logit distillation: forward or reverse KL to the teacher (default: traces only)",
                         choices=tuple(KL))
    kl_weight: float = opt(1.0, "weight of the KL term (with --kl)")
    eval_size: int = opt(100, "held-out problems for the student's pass@1")
    eval_samples: int = opt(1, "samples per held-out problem")
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if not self.teacher or not self.out:
            raise ValueError("DistillConfig: --teacher and --out are required")
        if is_builtin(self.dataset):
            task_from_spec(self.dataset)
        elif not Path(self.dataset).exists():
            raise ValueError(f"DistillConfig.dataset={self.dataset!r}: neither a built-in task nor an existing path")
        if self.kl is not None and self.kl not in KL:
            raise ValueError(f"DistillConfig.kl={self.kl!r}: expected one of {', '.join(KL)}")
        for name in ("num_prompts", "samples_per_prompt", "traces_per_prompt", "max_new_tokens", "seq_len",
                     "eval_size", "eval_samples", "batch_size_generate"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"DistillConfig.{name}={getattr(self, name)!r}: must be a positive integer")
        if not is_spec(self.student) and not Path(self.student).is_dir():
            raise ValueError(f"DistillConfig.student={self.student!r}: neither a preset ({', '.join(_preset_names())}), "
                             "a family spec such as qwen2:hidden=256,layers=4,heads=4,kv_heads=2,inter=768, "
                             "nor a checkpoint folder")


def _preset_names() -> list[str]:
    from ..config import PRESETS
    return sorted(PRESETS)


# ----------------------------------------------------------------------------- (a) traces

def is_accepted(text: str, finish_reason: str, example, prompt_text: str) -> bool:
    """Rejection sampling's rule: a finished trace with the right answer in the right format."""
    return finish_reason == "stop" and is_correct(text, example) and is_well_formatted(prompt_text, text)


def rejection_sample(engine: Engine, tokenizer: Tokenizer, examples: list, samples_per_prompt: int,
                     traces_per_prompt: int, max_new_tokens: int, temperature: float, top_p: float,
                     batch_size: int = 64, seed: int = 0, progress: bool = True,
                     first_index: int = 0) -> tuple[list, dict]:
    """The teacher's correct, well-formatted traces as conversations, and the counts behind them.
    Sample j of prompt i is drawn with seed row_seeds(seed, first_index + i, ...): the same trace
    whatever the batching and whichever process (first_index: the index of examples[0] in the run)."""
    traces, stats = [], {"prompts": len(examples), "samples": 0, "correct": 0, "kept": 0, "prompts_covered": 0}
    per_call = max(1, batch_size // samples_per_prompt)
    bar = tqdm(total=len(examples), disable=not progress, unit="prompt", desc="teacher traces", dynamic_ncols=True)
    for a in range(0, len(examples), per_call):
        chunk = examples[a:a + per_call]
        rendered = [render_prompt(tokenizer, ex) for ex in chunk]  # chat layout: the student learns chats
        outs = engine.generate([ids for _, ids in rendered for _ in range(samples_per_prompt)], max_new_tokens,
                               temperature=temperature, top_p=top_p,
                               seeds=row_seeds(seed, first_index + a, len(chunk), samples_per_prompt))
        for j, (ex, (prompt_text, _)) in enumerate(zip(chunk, rendered)):
            kept = set()
            for i in range(j * samples_per_prompt, (j + 1) * samples_per_prompt):
                text = tokenizer.decode(outs[i].tokens)
                stats["samples"] += 1
                stats["correct"] += outs[i].finish_reason == "stop" and is_correct(text, ex)
                if is_accepted(text, outs[i].finish_reason, ex, prompt_text) and len(kept) < traces_per_prompt \
                        and text not in kept:
                    kept.add(text)
                    reasoning, content = tokenizer.split_reasoning(text)
                    asked = (ex.meta or {}).get("prompt_messages") or [{"role": "user", "content": ex.prompt}]
                    traces.append(list(asked) + [{"role": "assistant", "content": content,
                                                  "reasoning_content": reasoning}])
            stats["kept"] += len(kept)
            stats["prompts_covered"] += bool(kept)
        bar.update(len(chunk))
    bar.close()
    return traces, stats


# ----------------------------------------------------------------------------- the student

def build_student(cfg: DistillConfig, tokenizer: Tokenizer) -> Transformer:
    """A student built from a preset or a family spec (``ModelConfig.from_spec``: ``qwen2:...``
    writes a standard Qwen2 checkpoint, as R1 distilled into) on the teacher's vocabulary and sized
    by the flags, or a loaded checkpoint."""
    if Path(cfg.student).is_dir():
        student = load_pretrained(cfg.student, dtype=torch.float32)
        if student.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"{cfg.student}: vocab_size {student.config.vocab_size} is smaller than the teacher "
                             f"tokenizer's {tokenizer.vocab_size}")
        return student
    mcfg = ModelConfig.from_spec(cfg.student, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                                 eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    if cfg.student_layers is not None:
        mcfg = mcfg.replace(num_hidden_layers=cfg.student_layers,
                            first_k_dense_replace=min(mcfg.first_k_dense_replace, cfg.student_layers))
    if cfg.student_hidden_size is not None:
        scale = cfg.student_hidden_size / mcfg.hidden_size
        mcfg = mcfg.replace(hidden_size=cfg.student_hidden_size,
                            intermediate_size=max(8, round(mcfg.intermediate_size * scale)),
                            moe_intermediate_size=max(8, round(mcfg.moe_intermediate_size * scale)))
    if cfg.dense:
        mcfg = mcfg.replace(n_routed_experts=0, n_shared_experts=0)
    torch.manual_seed(cfg.train.seed)
    return build_model(mcfg)


# ----------------------------------------------------------------------------- (b) logits

def logit_distill(student: Transformer, teacher: Transformer, rows, cfg: TrainConfig, kl_fn, kl_weight: float,
                  out_dir: Path, tokenizer: Tokenizer, meta: dict, env: DistEnv = DistEnv()) -> Path:
    """CE on the traces + kl_weight * kl_fn(student, teacher) at every assistant token; AdamW with
    the loop's schedule and clipping; metrics.jsonl and a checkpoint at the end. Several processes:
    the student parallelized as cfg says, each process taking its share of every step's rows."""
    if cfg.batch_size % (cfg.micro_batch_size * env.world_size):
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of micro_batch_size × processes "
                         f"= {cfg.micro_batch_size} × {env.world_size}")
    device = env.device
    student.to(device).train()
    teacher.to(device).eval().requires_grad_(False)
    forward, meshes = parallelize(ModelForward(student), layout_of(cfg, env), device.type)
    clip = None if meshes is None else functools.partial(clip_grad_norm, meshes=meshes)
    optimizer = build_adamw(student, cfg.lr, cfg.weight_decay)
    sampler = RowSampler(len(rows), cfg.batch_size, cfg.seed)
    bar = tqdm(total=cfg.steps, disable=not (cfg.progress and env.is_main), unit="step", desc="distill (KL)",
               dynamic_ncols=True)
    log, t0 = MetricsLog(out_dir / "metrics.jsonl", enabled=env.is_main), time.perf_counter()
    for step in range(cfg.steps):
        idx = sampler.rows(step).view(env.world_size, -1)[env.rank]
        ids, docs, targets = (getattr(rows, n)[idx].to(device) for n in ("input_ids", "doc_ids", "targets"))
        n_tok = int(all_reduce_sum((targets != IGNORE).sum(), env))  # over the whole batch of every process
        sums = torch.zeros(2, device=device)
        for a in range(0, len(idx), cfg.micro_batch_size):
            sl = slice(a, a + cfg.micro_batch_size)
            pos, mask = document_positions(docs[sl]), attention_mask(docs[sl])
            with torch.no_grad():
                teacher_logits = teacher(ids[sl], pos, mask)
            logits = forward(ids[sl], pos, mask)
            ce = cross_entropy(logits, targets[sl], n_tok)
            kl = kl_fn(logits, teacher_logits, targets[sl] != IGNORE, num_tokens=n_tok)
            ((ce + kl_weight * kl) * env.world_size).backward()  # FSDP averages gradients over processes
            sums += torch.stack([ce.detach(), kl.detach()])
        sums = all_reduce_sum(sums, env)
        lr = cfg.lr_at(step)
        grad_norm = optimizer_step(student, optimizer, lr, cfg.grad_clip, where=f"distill step {step + 1}",
                                   clip=clip)
        row = {"step": step + 1, "loss": float(sums[0]), "kl": float(sums[1]), "lr": lr, "grad_norm": grad_norm,
               "elapsed_s": time.perf_counter() - t0}
        log.append(row)
        bar.update(1)
        bar.set_postfix(ce=f"{row['loss']:.3f}", kl=f"{row['kl']:.3f}")
    bar.close()
    save_run_checkpoint(out_dir, student, optimizer, cfg.steps, env, meshes, tokenizer, meta)
    return out_dir


# ----------------------------------------------------------------------------- the run

def distill(cfg: DistillConfig, env: DistEnv | None = None) -> dict:
    """Teacher traces -> student fine-tuned on them (and optionally on the teacher's logits).
    Returns the summary written to out/distill.json. Under torchrun every process joins (see the
    module's docstring)."""
    own_env = env is None
    env = env or init_distributed(resolve_device(cfg.device))
    try:
        return _run(cfg, env)
    finally:
        if own_env:
            shutdown(env)


def teacher_traces(teacher: Transformer, tokenizer: Tokenizer, prompts: list, cfg: DistillConfig,
                   env: DistEnv) -> tuple[list, dict]:
    """Rejection-sampled traces of all `prompts`, each process sampling its share, gathered in order."""
    mine = share(len(prompts), env)
    t0, c0 = time.perf_counter(), time.process_time()
    traces, stats = rejection_sample(Engine(teacher, tokenizer), tokenizer, prompts[mine], cfg.samples_per_prompt,
                                     cfg.traces_per_prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                     cfg.batch_size_generate, seed=cfg.train.seed,
                                     progress=cfg.train.progress and env.is_main, first_index=mine.start)
    cpu = time.process_time() - c0
    parts = all_gather_objects((traces, stats, cpu), env)
    traces = [t for part, _, _ in parts for t in part]
    stats = {k: sum(p[1][k] for p in parts) for k in stats}
    stats["seconds"], stats["cpu_seconds"] = time.perf_counter() - t0, sum(p[2] for p in parts)
    return traces, stats


def _run(cfg: DistillConfig, env: DistEnv) -> dict:
    out = Path(cfg.out)
    refuse_existing_run(out, resumable=False)
    barrier(env)  # every process has looked before process 0 makes the folder
    if env.is_main:
        start_fresh(out)
    teacher, tokenizer = load_with_tokenizer(cfg.teacher, dtype=torch.float32, device=env.device)
    prompts, held_out = train_and_held_out(cfg.dataset, cfg.split, cfg.eval_dataset, "test", cfg.eval_size,
                                           cfg.prompt_column, cfg.answer_column, n=cfg.num_prompts, seed=cfg.train.seed)
    traces, stats = teacher_traces(teacher, tokenizer, prompts, cfg, env)
    if env.is_main:
        atomic_write_text(out / "traces.jsonl", "".join(json.dumps({"messages": m}) + "\n" for m in traces))
        print(f"distill: teacher kept {stats['kept']} traces from {stats['samples']} samples "
              f"({stats['correct']} correct) covering {stats['prompts_covered']}/{stats['prompts']} prompts")
    if not traces:
        raise ValueError(f"{cfg.teacher}: the teacher solved none of {cfg.num_prompts} prompts; nothing to distill")

    student = build_student(cfg, tokenizer)
    n_params = student.num_params()

    def evaluate(model) -> dict:
        return evaluate_accuracy(model, tokenizer, None, max_new_tokens=cfg.max_new_tokens, k=cfg.eval_samples,
                                 temperature=0.6, top_p=0.95, seed=cfg.train.seed, examples=held_out,
                                 progress=cfg.train.progress, desc="student eval")

    before = evaluate(student) if env.is_main else None
    rows = pack_conversations(traces, tokenizer, cfg.seq_len)  # SFT's packing: assistant tokens are the targets
    meta = {"stage": "distill", "source": {"teacher": cfg.teacher, "student": cfg.student, "dataset": cfg.dataset,
                                           "kl": cfg.kl, "traces": stats}}
    t1, c1 = time.perf_counter(), time.process_time()
    if cfg.kl is None:
        train(student, rows, cfg.train, out, tokenizer, stage="distill", meta=meta, env=env)
    else:
        logit_distill(student, teacher, rows, cfg.train, KL[cfg.kl], cfg.kl_weight, out, tokenizer, meta, env)
    summary = None
    if env.is_main:  # a sharded student is read back whole from its checkpoint
        after = evaluate(load_pretrained(out, dtype=torch.float32, device=env.device) if env.distributed else student)
        summary = {"teacher": cfg.teacher, "student": cfg.student, "student_params": n_params,
                   "teacher_params": teacher.num_params(), "traces": stats, "processes": env.world_size,
                   "train_seconds": time.perf_counter() - t1, "train_cpu_seconds": time.process_time() - c1,
                   "pass@1_before": before["pass@1"], "pass@1_after": after["pass@1"],
                   "eval": {k: v for k, v in after.items() if k != "samples"},
                   "config": dataclasses.asdict(cfg)}
        atomic_write_text(out / "distill.json", json.dumps(summary, indent=1))
        print(f"distill: student ({n_params:,} parameters) held-out pass@1 "
              f"{before['pass@1']:.1%} -> {after['pass@1']:.1%}; checkpoint in {out}")
    return all_gather_objects(summary, env)[0]
