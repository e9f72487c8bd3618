"""The demo's stages, in the order they run. Each takes the Context and returns a JSON-able dict.

Stages call the library (nanoseek.train, nanoseek.rl, nanoseek.quant, nanoseek.inference) as Python
functions; nothing here trains, samples or quantizes by itself. Folders under the demo's --out:

    init/ student_init/   untrained teacher and student with the demo's tokenizer
    pretrain/ sft/ grpo/  the teacher after each training stage (Hugging Face checkpoints)
    r1_zero_base/         pretrain/ pretrained further, mostly on one-line answers (R1-Zero's base)
    r1_zero/              GRPO straight from r1_zero_base/ (R1-Zero), with r1_zero.png
    student/              the student's short pretraining (its base for both recipes)
    student_distill/ student_grpo/   the student distilled from the teacher / trained by GRPO alone
    int8/                 the final teacher quantized to int8 (when nanoseek.quant can save one)
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..hf import load_pretrained, save_pretrained
from ..config import ModelConfig
from ..data import extract_answer, get_task, load_data
from ..data.prompts import prompt_ids
from ..inference import Engine
from ..estimate import estimate
from ..model import Transformer
from ..plots import read_metrics
from ..tokenizer import Tokenizer
from ..train.loop import TrainConfig
from ..train.state import TRAIN_STATE
from .config import DemoConfig

# DeepSeek-R1's evaluation sampling (R1 paper, §3): temperature 0.6, top-p 0.95.
R1_TEMPERATURE, R1_TOP_P = 0.6, 0.95


@dataclass
class Context:
    out: Path
    cfg: DemoConfig
    results: dict  # stage name -> {"status", "seconds", "result"} (state.json's "stages")

    def dir(self, name: str) -> Path:
        return self.out / name

    def done(self, name: str) -> bool:
        return self.results.get(name, {}).get("status") == "done"

    def result(self, name: str) -> dict:
        return self.results.get(name, {}).get("result", {})

    @property
    def task(self):
        return get_task(self.cfg.task)

    def held_out(self, n: int | None = None):
        """The test split: problems no training stage ever sees (hash-disjoint from train)."""
        return self.task.examples("test", n or self.cfg.eval_examples, seed=self.cfg.seed)

    def train_config(self, steps: int, lr: float | None = None, warmup: int | None = None) -> TrainConfig:
        cfg = self.cfg
        return TrainConfig(steps=steps, batch_size=cfg.batch_size, micro_batch_size=cfg.batch_size,
                           lr=lr or cfg.lr, warmup_steps=min(warmup if warmup is not None else 50, steps // 4),
                           seed=cfg.seed, checkpoint_every=max(1, steps // 4))


def final_model(out: Path, results: dict) -> Path | None:
    """The last teacher stage that finished: grpo, else sft, else pretrain."""
    for name in ("grpo", "sft", "pretrain"):
        if results.get(name, {}).get("status") == "done":
            return out / name
    return None


# ----------------------------------------------------------------------------- evaluation

def evaluate(ctx: Context, model: Transformer, tokenizer: Tokenizer, layout: str = "chat", desc: str = "eval",
             **sampling) -> dict:
    """Held-out exact-match accuracy (nanoseek.train.evaluate), without the per-sample texts."""
    from ..train.evaluate import evaluate_accuracy
    res = evaluate_accuracy(model, tokenizer, ctx.task, max_new_tokens=ctx.cfg.max_new_tokens, layout=layout,
                            examples=ctx.held_out(), seed=ctx.cfg.seed, desc=desc, **sampling)
    res.pop("samples")
    return res


def evaluate_dir(ctx: Context, name: str, layout: str = "chat", **sampling) -> dict:
    path = ctx.dir(name)
    return evaluate(ctx, load_pretrained(path, dtype=torch.float32), Tokenizer.from_pretrained(path), layout,
                    desc=f"eval {name}", **sampling)


# ----------------------------------------------------------------------------- training stages

def _new_model(cfg: ModelConfig, tokenizer: Tokenizer, seed: int, path: Path) -> dict:
    cfg = cfg.replace(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                      eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    save_pretrained(model, path)
    tokenizer.save_pretrained(path)
    return {"params": model.num_params(), "active_params": model.num_params(active=True),
            "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size, "experts": cfg.n_routed_experts}


def student_config() -> ModelConfig:
    """The student: a small dense Qwen2-architecture model (as R1 distilled into Qwen2 and Llama), so
    what the demo distills is a standard checkpoint transformers and llama.cpp load; same tokenizer."""
    return ModelConfig.preset("tiny-qwen2").replace(hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2)


def stage_tokenizer(ctx: Context) -> dict:
    """Byte-level BPE on the built-in corpus; the untrained teacher and student are saved with it."""
    cfg = ctx.cfg
    docs = load_data(cfg.task, n=cfg.pretrain_examples, split="train", seed=cfg.seed)
    teacher = ModelConfig.preset("tiny")
    tok = Tokenizer.train(docs, vocab_size=teacher.vocab_size)
    ids = tok.encode_batch(docs[:500])
    example = ctx.task.examples("train", 1, seed=cfg.seed)[0]
    return {"vocab_size": tok.vocab_size, "documents": len(docs),
            "tokens_per_document": statistics.mean(len(x) for x in ids),
            "bytes_per_token": sum(len(d.encode()) for d in docs[:500]) / sum(len(x) for x in ids),
            "example": example.text(),
            "teacher": _new_model(teacher, tok, cfg.seed, ctx.dir("init")),
            "student": _new_model(student_config(), tok, cfg.seed + 1, ctx.dir("student_init"))}


def _pretrain(ctx: Context, name: str, start: str, steps: int, direct_fraction: float = 0.0) -> dict:
    """nanoseek.train.pretrain from the checkpoint `start`, resuming a run cut short in DIR/name;
    direct_fraction: the share of one-line answers in the corpus (data.loaders.load_data)."""
    from ..train.pretrain import PretrainConfig, pretrain

    out = ctx.dir(name)
    resume = (out / TRAIN_STATE).exists()
    pretrain(PretrainConfig(out=str(out), data=ctx.cfg.task, model=None if resume else str(ctx.dir(start)),
                            seq_len=ctx.cfg.seq_len, num_examples=ctx.cfg.pretrain_examples, resume=resume,
                            direct_fraction=direct_fraction,
                            train=ctx.train_config(steps)))
    return training_summary(out)


def training_summary(out: Path) -> dict:
    rows = read_metrics(out / "metrics.jsonl")
    last = rows[-1]
    speeds = [r["tokens_per_s"] for r in rows[1:]] or [last["tokens_per_s"]]
    return {"steps": last["step"], "loss": last["loss"], "mtp_loss": last.get("mtp_loss"),
            "first_loss": rows[0]["loss"], "tokens": last["tokens"], "tokens_per_s": statistics.median(speeds),
            "mfu": statistics.median(r["mfu"] for r in rows[1:] or rows),
            "expert_load_max_mean": last.get("expert_load_max_mean"),
            "first_expert_load_max_mean": rows[0].get("expert_load_max_mean")}


def stage_pretrain(ctx: Context) -> dict:
    """The tiny DeepSeek-V3-style teacher: MLA + DeepSeekMoE + MTP loss, aux-loss-free balancing."""
    result = _pretrain(ctx, "pretrain", "init", ctx.cfg.pretrain_steps)
    # a base model is asked in its pretraining layout: "{prompt}\n<think>\n"
    result["eval"] = evaluate_dir(ctx, "pretrain", layout="text")
    return result


def stage_sft(ctx: Context) -> dict:
    """Supervised fine-tuning on conversations in DeepSeek-R1's format: <think> reasoning </think> answer."""
    from ..train.sft import SFTConfig, sft
    out = ctx.dir("sft")
    resume = (out / TRAIN_STATE).exists()
    sft(SFTConfig(out=str(out), model=str(ctx.dir("pretrain")), dataset=ctx.cfg.task, seq_len=ctx.cfg.seq_len,
                  num_examples=ctx.cfg.sft_examples, data_seed=ctx.cfg.seed + 1, resume=resume,
                  train=ctx.train_config(ctx.cfg.sft_steps, lr=1e-3, warmup=10)))
    return {**training_summary(out), "eval": evaluate_dir(ctx, "sft")}


def _grpo(ctx: Context, name: str, start: str, steps: int, max_minutes: float | None = None,
          reward: tuple[str, ...] = ("accuracy",), layout: str = "chat", lr: float | None = None, **settings) -> dict:
    """nanoseek.rl.grpo from DIR/start, resuming a run cut short; the held-out pass@1 at R1's sampling
    settings at its start and end, each with its standard error. settings: further GRPOConfig fields.

    After SFT the accuracy reward alone: with a 0.1 format bonus, groups whose answers are all wrong
    differ only by the bonus, and the group-std normalisation blows those differences up to full-size
    advantages; at this scale that collapsed pass@1 (58% -> 4% in 40 steps at lr 3e-4; see
    BENCHMARKS.md, GRPO).
    """
    from ..rl.grpo import GRPOConfig, grpo
    cfg, out = ctx.cfg, ctx.dir(name)
    t0 = time.perf_counter()
    grpo(GRPOConfig(model=str(ctx.dir(start)), out=str(out), dataset=cfg.task, steps=steps, layout=layout,
                    prompts_per_step=cfg.grpo_prompts, group_size=cfg.grpo_group, max_new_tokens=cfg.max_new_tokens,
                    lr=lr or cfg.grpo_lr, reward=list(reward), eval_every=0, eval_size=cfg.eval_examples,
                    eval_samples=cfg.grpo_eval_samples, sample_every=max(1, steps // 4),
                    checkpoint_every=max(1, steps // 4), max_minutes=max_minutes, seed=cfg.seed,
                    resume=(out / TRAIN_STATE).exists(), **settings))
    rows = read_metrics(out / "metrics.jsonl")
    trained = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "eval/pass@1" in r]
    return {"steps": trained[-1]["step"] if trained else 0, "train_s": time.perf_counter() - t0,
            "reward": list(reward), "layout": layout,
            "sampled_pass@1_start": evals[0]["eval/pass@1"] if evals else None,
            "sampled_pass@1_end": evals[-1]["eval/pass@1"] if evals else None,
            "sampled_stderr_start": evals[0].get("eval/stderr") if evals else None,
            "sampled_stderr_end": evals[-1].get("eval/stderr") if evals else None,
            "reward_first": trained[0]["reward_mean"] if trained else None,
            "reward_last": trained[-1]["reward_mean"] if trained else None,
            "no_signal_groups": _mean_of(trained, "no_signal_groups"),
            "zero_signal_rate": _mean_of(trained, "dynamic/zero_signal_rate"),
            "resample_rounds": _mean_of(trained, "dynamic/rounds"),
            "eval": evaluate_dir(ctx, name, layout=layout)}


def _mean_of(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.mean(values) if values else None


def stage_grpo(ctx: Context) -> dict:
    """GRPO (DeepSeekMath, DeepSeek-R1) from the SFT model: the accuracy reward, group-normalised, with
    DAPO's dynamic sampling (only groups whose samples disagree are trained on) and no KL reference."""
    cfg = ctx.cfg
    return _grpo(ctx, "grpo", "sft", cfg.grpo_steps, dynamic_sampling=cfg.grpo_dynamic_sampling,
                 max_resample_rounds=cfg.grpo_max_resample_rounds, beta=cfg.grpo_beta)


def _window_mean(rows: list[dict], key: str, first: bool, n: int = 5) -> float | None:
    """The mean of `key` over the first (or last) n steps that logged it: one step's 64 samples are noisy."""
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    values = values[:n] if first else values[-n:]
    return statistics.mean(values) if values else None


def stage_r1_zero_base(ctx: Context) -> dict:
    """R1-Zero's base: the pretrained model pretrained further on a corpus where most documents state the
    result in one line (r1_zero_direct_fraction), the rest the worked steps. It mostly answers short and
    wrong, yet knows the longer worked form: the situation in which R1-Zero's reasoning grew under RL."""
    cfg = ctx.cfg
    result = _pretrain(ctx, "r1_zero_base", "pretrain", cfg.r1_zero_base_steps, cfg.r1_zero_direct_fraction)
    result["direct_fraction"] = cfg.r1_zero_direct_fraction
    result["eval"] = evaluate_dir(ctx, "r1_zero_base", layout="text")
    return result


def stage_r1_zero(ctx: Context) -> dict:
    """DeepSeek-R1-Zero in miniature: GRPO straight from a base (r1_zero_base; no SFT), prompts in the
    pretraining text layout, the accuracy + format reward; accuracy and mean response length over steps."""
    from ..plots import plot_r1_zero
    result = _grpo(ctx, "r1_zero", "r1_zero_base", ctx.cfg.r1_zero_steps, reward=("accuracy", "format=0.1"),
                   layout="text", lr=ctx.cfg.r1_zero_lr)
    rows = [r for r in read_metrics(ctx.dir("r1_zero") / "metrics.jsonl") if "reward_mean" in r]
    plot_r1_zero(rows, ctx.dir("r1_zero") / "r1_zero.png")
    return {**result, **{f"{key}_{end}": _window_mean(rows, key, end == "first")
                         for key in ("accuracy", "response_length", "reward/format") for end in ("first", "last")}}


def stage_evaluate(ctx: Context) -> dict:
    """Held-out pass@1 of every teacher stage (greedy), and with R1's sampling settings for the last."""
    final = final_model(ctx.out, ctx.results)
    sampled = evaluate_dir(ctx, final.name, temperature=R1_TEMPERATURE, top_p=R1_TOP_P)
    results = {name: ctx.result(name).get("eval") for name in ("pretrain", "sft", "grpo")}
    return {**{k: v for k, v in results.items() if v is not None}, "final": final.name,
            "sampled_pass@1": sampled["pass@1"]}


def stage_student(ctx: Context) -> dict:
    """A smaller student's short pretraining: the common base of the distilled and the RL-only student."""
    result = _pretrain(ctx, "student", "student_init", ctx.cfg.student_pretrain_steps)
    result["eval"] = evaluate_dir(ctx, "student", layout="text")
    return result


def stage_distill(ctx: Context) -> dict:
    """R1-style distillation: the teacher's correct reasoning traces (rejection sampling) -> student SFT."""
    from ..rl.distill import DistillConfig, distill
    cfg, out = ctx.cfg, ctx.dir("student_distill")
    teacher = final_model(ctx.out, ctx.results)
    shutil.rmtree(out, ignore_errors=True)  # distill does not resume: a cut-short run starts over
    t0 = time.perf_counter()
    try:
        summary = distill(DistillConfig(teacher=str(teacher), out=str(out), student=str(ctx.dir("student")),
                                        dataset=cfg.task, num_prompts=cfg.distill_prompts, samples_per_prompt=2,
                                        max_new_tokens=cfg.max_new_tokens, seq_len=cfg.seq_len,
                                        eval_size=cfg.eval_examples,
                                        train=ctx.train_config(cfg.distill_steps, lr=1e-3, warmup=10)))
    except ValueError:
        traces = out / "traces.jsonl"
        if not traces.exists() or traces.read_text().strip():
            raise
        # a teacher that solved nothing (the --quick sizes) leaves nothing to distill: say so
        return {"teacher": teacher.name, "train_s": time.perf_counter() - t0, "skipped":
                f"the teacher solved none of {cfg.distill_prompts} training prompts: no trace to distill"}
    return {"teacher": teacher.name, "train_s": time.perf_counter() - t0, "traces": summary["traces"],
            "eval": evaluate_dir(ctx, "student_distill")}


def stage_student_grpo(ctx: Context) -> dict:
    """The same student trained by GRPO alone from its base, for the distilled student's wall-clock
    (DeepSeek-R1's comparison: RL on the small model vs distillation into it)."""
    budget = ctx.result("distill").get("train_s")
    return _grpo(ctx, "student_grpo", "student", 10_000 if budget else ctx.cfg.grpo_steps,
                 max_minutes=budget / 60 if budget else None)


# ----------------------------------------------------------------------------- inference stages

def prompts_for_bench(ctx: Context, tokenizer: Tokenizer) -> list[list[int]]:
    return [prompt_ids(tokenizer, ex, "chat") for ex in ctx.held_out(ctx.cfg.bench_prompts)]


def decode_speeds(models: dict, prompts: list[list[int]], max_new_tokens: int, repeats: int) -> dict:
    """Batch-1 greedy decoding, each (name -> (model, generate kwargs)) timed on every prompt in
    interleaved rounds, so a shared machine's slow moments hit every variant alike. Median tokens/s."""
    engines = {name: (Engine(model), kw) for name, (model, kw) in models.items()}
    for engine, kw in engines.values():
        engine.generate([prompts[0]], 4, **kw)  # warm-up
    rates = {name: [] for name in engines}
    stats = {name: {"drafted": 0, "accepted": 0, "tokens": 0, "forwards": 0, "outputs": []} for name in engines}
    for r in tqdm(range(repeats), desc="decode benchmark", unit="round", dynamic_ncols=True):
        for p in prompts:
            for name, (engine, kw) in engines.items():
                t0 = time.perf_counter()
                out = engine.generate([p], max_new_tokens, **kw)[0].tokens
                rates[name].append(len(out) / (time.perf_counter() - t0))
                if r == 0:
                    s, st = engine.stats, stats[name]
                    st["drafted"] += s["drafted"]
                    st["accepted"] += s["accepted"]
                    st["tokens"] += len(out)
                    st["forwards"] += s["row_forwards"]
                    st["outputs"].append(out)
    return {name: {"tokens_per_s": statistics.median(rates[name]), "tokens": st["tokens"],
                   "acceptance_rate": st["accepted"] / st["drafted"] if st["drafted"] else None,
                   "tokens_per_forward": st["tokens"] / max(st["forwards"], 1), "outputs": st["outputs"]}
            for name, st in stats.items()}


def stage_quantize(ctx: Context) -> dict:
    """int8 weight-only quantization of the final teacher: held-out accuracy, loss and batch-1 decode speed."""
    from ..quant import quantize_model
    from ..train.evaluate import evaluate_loss
    final = final_model(ctx.out, ctx.results)
    tok = Tokenizer.from_pretrained(final)
    models = {"fp32": load_pretrained(final, dtype=torch.float32), "bf16": load_pretrained(final, dtype=torch.bfloat16),
              "int8": quantize_model(load_pretrained(final, dtype=torch.float32), "int8")}
    speeds = decode_speeds({k: (m, {}) for k, m in models.items()}, prompts_for_bench(ctx, tok), ctx.cfg.bench_tokens,
                           ctx.cfg.bench_repeats)
    rows = {}
    for fmt, model in models.items():
        loss = evaluate_loss(model, tok, ctx.task, layout="chat", seq_len=ctx.cfg.seq_len, examples=ctx.held_out())
        rows[fmt] = {"tokens_per_s": speeds[fmt]["tokens_per_s"], "held_out_loss": loss["loss"],
                     "weight_bytes": sum(t.numel() * t.element_size()
                                         for t in list(model.parameters()) + list(model.buffers())),
                     "same_greedy_output_as_fp32": speeds[fmt]["outputs"] == speeds["fp32"]["outputs"]}
        if fmt != "bf16":  # accuracy for the two the comparison is about; bf16 is the speed baseline
            rows[fmt]["pass@1"] = evaluate(ctx, model, tok, desc=f"eval {fmt}")["pass@1"]
    return {"model": final.name, "formats": rows,
            "int8_speedup_vs_fp32": rows["int8"]["tokens_per_s"] / rows["fp32"]["tokens_per_s"],
            "int8_speedup_vs_bf16": rows["int8"]["tokens_per_s"] / rows["bf16"]["tokens_per_s"]}


def stage_inference(ctx: Context) -> dict:
    """MLA's latent cache vs per-head K/V caching, and MTP self-speculative decoding."""
    final = final_model(ctx.out, ctx.results)
    model = load_pretrained(final, dtype=torch.float32)
    cfg = model.config
    # bytes per token in bf16, as DeepSeek-V2 counts them: MLA keeps (d_c + d_h^R) numbers per layer,
    # multi-head attention of the same width keeps a key and a value per head
    mla = cfg.cache_bytes_per_token(2)
    mha = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers * 2
    v3 = estimate(ModelConfig.preset("deepseek-v3"))
    prompts = prompts_for_bench(ctx, Tokenizer.from_pretrained(final))
    runs = decode_speeds({"plain": (model, {}), "mtp": (model, {"speculative": "mtp"})}, prompts,
                         ctx.cfg.bench_tokens, ctx.cfg.bench_repeats)
    plain, spec = runs["plain"], runs["mtp"]
    return {"model": final.name,
            "cache": {"mla_bytes_per_token": mla, "mha_bytes_per_token": mha, "reduction": 1 - mla / mha,
                      "engine_bytes_per_token_fp32": Engine(model).cache_bytes_per_token(),
                      "deepseek_v3_mla_bytes_per_token": v3.kv_cache_bytes_per_token,
                      "deepseek_v3_mha_bytes_per_token": v3.mha_cache_bytes_per_token},
            "mtp": {"acceptance_rate": spec["acceptance_rate"], "tokens_per_forward": spec["tokens_per_forward"],
                    "plain_tokens_per_s": plain["tokens_per_s"], "mtp_tokens_per_s": spec["tokens_per_s"],
                    "speedup": spec["tokens_per_s"] / plain["tokens_per_s"],
                    "same_output": spec["outputs"] == plain["outputs"], "tokens": spec["tokens"]}}


def stage_samples(ctx: Context) -> dict:
    """A few held-out problems answered by the final model with R1's sampling settings."""
    final = final_model(ctx.out, ctx.results)
    tok = Tokenizer.from_pretrained(final)
    engine = Engine(load_pretrained(final, dtype=torch.float32), tok)
    examples = ctx.held_out(ctx.cfg.samples)
    outs = engine.generate([prompt_ids(tok, ex, "chat") for ex in examples], ctx.cfg.max_new_tokens,
                           temperature=R1_TEMPERATURE, top_p=R1_TOP_P, seed=ctx.cfg.seed)
    samples = []
    for ex, out in zip(examples, outs):
        text, why = tok.decode(out.tokens), out.finish_reason
        reasoning, answer = tok.split_reasoning(text)
        samples.append({"prompt": ex.prompt, "reasoning": reasoning, "answer": answer, "expected": ex.answer,
                        "correct": bool(ctx.task.check(extract_answer(text), ex)), "finish": why})
    return {"model": final.name, "samples": samples}


def stage_vision(ctx: Context) -> dict:
    """A tiny hybrid VL model (64 px SigLIP + 128 px SAM towers, 2-layer Llama) learns the shapes task from scratch."""
    from ..train.vl_sft import VLSFTConfig, vl_sft
    c = ctx.cfg
    return vl_sft(VLSFTConfig(out=str(ctx.out / "vision"), steps=c.vl_steps, n_train=c.vl_train_examples,
                              n_eval=c.vl_eval_examples, seed=c.seed), log=lambda *_: None)


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    fn: Callable[[Context], dict]


STAGES = [
    Stage("tokenizer", "byte-level BPE with DeepSeek-R1's chat tokens", stage_tokenizer),
    Stage("pretrain", "tiny DeepSeek-V3-style model: MLA + MoE + MTP, aux-loss-free balancing", stage_pretrain),
    Stage("sft", "supervised fine-tuning with <think> reasoning", stage_sft),
    Stage("grpo", "GRPO with rule-based rewards", stage_grpo),
    Stage("r1_zero_base", "R1-Zero's base: further pretraining, mostly on one-line answers", stage_r1_zero_base),
    Stage("r1_zero", "R1-Zero: GRPO straight from the base", stage_r1_zero),
    Stage("evaluate", "held-out pass@1 before and after GRPO", stage_evaluate),
    Stage("student", "pretrain a smaller student", stage_student),
    Stage("distill", "distill the teacher's reasoning into the student", stage_distill),
    Stage("student_grpo", "the same student by GRPO alone", stage_student_grpo),
    Stage("quantize", "int8 weight-only: accuracy and decode speed", stage_quantize),
    Stage("inference", "MLA cache size and MTP speculative decoding", stage_inference),
    Stage("samples", "sample answers with their reasoning", stage_samples),
    Stage("vision", "a tiny vision-language model answers questions about images", stage_vision),
]
