"""GRPO and distillation demo figures (issue 5), reproducible by one command:

    python benchmarks/bench_rl.py --out runs/bench_rl                # ~45 min on 2 shared cores
    python benchmarks/bench_rl.py --out runs/bench_rl_smoke --quick  # every stage, tiny budgets

Stages, each in its own folder under --out and skipped when already finished (so a rerun resumes):
  1. cold start (R1's recipe): a byte-level BPE trained on the task, the `tiny` preset, a short SFT
     on worked solutions (nanoseek.train's loop, assistant tokens only);
  2. GRPO from it for --grpo-minutes of CPU time (evaluations not counted; on 2 dedicated cores that is
     at most as many wall-clock minutes, and a busy shared machine cannot shrink the run); held-out
     pass@1 before and after with R1's
     evaluation settings (temperature 0.6, top-p 0.95, pass@1 averaged over k samples);
  3. rollout throughput: completion tokens/s while GRPO samples, beside the engine's plain batched
     decode of the same batch shape on the same weights, outside the trainer;
  4. DeepSeek-R1's distillation claim at small scale: a smaller student (the tiny preset with 2 of
     its 4 layers) gets its own cold start of the same length, then either (a) `nanoseek distill` from the GRPO model's
     rejection-sampled traces or (b) GRPO alone, for the same CPU time; both held-out pass@1s.
Writes results.json and RESULTS_rl.md (a table with the command and machine) into --out.

    python benchmarks/bench_rl.py --vs-trl --out runs/bench_rl_trl --steps 50 --threads 1
    python benchmarks/bench_rl.py --vs-trl --out runs/bench_rl_trl_smoke --quick --steps 2

--vs-trl instead runs nanoseek's GRPO beside TRL's GRPOTrainer (trl_side.py; `pip install
nanoseek[bench]`) from one cold start (without the MTP module, so transformers loads the checkpoint
whole): the same prompts in the same order, nanoseek's accuracy reward, G, prompts per step, budget,
lr, beta, eps, AdamW betas, temperature 1, mu = 1, the grpo loss with group-scaled advantages,
--steps steps each, the same torch threads, one after the other in this process. Each side batches
its update its own way (TRL: one batch of P x G padded to the longest; nanoseek: micro-batches of 16
rows of like length, nanoseek.rl.rollouts.length_batches): the same gradient. Both trained models
are evaluated by nanoseek's held-out pass@1 (R1's settings, the same examples and seeds); reports
seconds per step, rollout tokens/s and the ratios, into VS_TRL.md and vs_trl.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanoseek.hf import load_pretrained  # noqa: E402
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.data import get_task  # noqa: E402
from nanoseek.inference import Engine  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from nanoseek.rl.distill import DistillConfig, distill  # noqa: E402
from nanoseek.data.prompts import render_prompt  # noqa: E402
from nanoseek.rl.grpo import GRPOConfig, grpo  # noqa: E402
from nanoseek.data.records import train_and_held_out  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402
from nanoseek.train.batches import RowSampler  # noqa: E402
from nanoseek.train.evaluate import evaluate_accuracy  # noqa: E402
from nanoseek.train.loop import TrainConfig, train  # noqa: E402
from nanoseek.train.sft import pack_conversations  # noqa: E402
from nanoseek.train.state import TRAIN_STATE  # noqa: E402


def done(path: Path) -> bool:
    return (path / TRAIN_STATE).exists()


def cold_start(out: Path, task_name: str, steps: int, overrides: dict, tokenizer_dir: Path | None, seed: int) -> Path:
    """Tokenizer (trained here, or shared) + a fresh preset model + a short SFT on worked solutions."""
    if done(out):
        return out
    task = get_task(task_name)
    conversations = [ex.messages() for ex in task.examples("train", 4000, seed=seed + 1)]
    if tokenizer_dir is None:
        texts = [ex.text() for ex in task.examples("train", 2000, seed=seed + 1)]
        tokenizer = Tokenizer.train(texts, vocab_size=512)
    else:
        tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                                             eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                                             **overrides)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    rows = pack_conversations(conversations, tokenizer, 512)
    train(model, rows, TrainConfig(steps=steps, batch_size=8, micro_batch_size=8, lr=3e-3, warmup_steps=10,
                                   seed=seed), out, tokenizer, stage="sft", meta={"bench": "rl cold start"})
    return out


def grpo_log(run: Path) -> tuple[list[dict], dict, dict, list]:
    """A GRPO run's step rows, its first and last held-out evaluations, and the pass@1 curve."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/pass@1" in r]
    return ([r for r in rows if "rollout_tokens_per_s" in r], evals[0], evals[-1],
            [(r["step"], r["eval/pass@1"]) for r in evals])


def run_grpo(out: Path, model: Path, task: str, minutes: float, args) -> Path:
    if not done(out):
        grpo(GRPOConfig(model=str(model), out=str(out), dataset=task, steps=10_000, max_cpu_minutes=minutes,
                        prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                        max_new_tokens=args.max_new_tokens, lr=args.grpo_lr, beta=args.beta, reward=args.reward,
                        micro_batch_size=32, eval_every=args.eval_every, eval_size=args.eval_size,
                        eval_samples=args.eval_samples, sample_every=10, seed=args.seed))
    return out


def plain_decode(path: Path, task_name: str, batch: int, group: int, max_new_tokens: int, repeats: int = 3) -> dict:
    """The engine alone on the rollout's batch shape (prompts x G, temperature 1): tokens/s, medians."""
    model, tok = load_pretrained(path, dtype=torch.float32), Tokenizer.from_pretrained(path)
    engine = Engine(model, tok)
    prompts = [render_prompt(tok, ex)[1] for ex in get_task(task_name).examples("train", batch, seed=99)]
    rates = []
    for r in range(repeats):
        t0 = time.perf_counter()
        outs = engine.generate([p for p in prompts for _ in range(group)], max_new_tokens, temperature=1.0, seed=r)
        rates.append(sum(len(o.tokens) for o in outs) / (time.perf_counter() - t0))
    return {"tokens_per_s": statistics.median(rates), "batch": batch * group}


def versus_trl(args, out: Path, results: dict) -> dict:
    """nanoseek's GRPO, then TRL's GRPOTrainer, from one cold start on the same prompts; both evaluated alike."""
    from trl_side import run_trl

    sft = cold_start(out / "sft", args.task, args.sft_steps, {"num_nextn_predict_layers": 0}, None, args.seed)
    num_train, P, G = 5000, args.prompts_per_step, args.group_size
    train_set, held = train_and_held_out(args.task, "train", None, "test", args.eval_size, n=num_train, seed=args.seed)
    order = RowSampler(len(train_set), P, args.seed)  # nanoseek's prompt order, handed to TRL as its dataset
    examples = [train_set[int(i)] for step in range(args.steps) for i in order.rows(step)]
    nano = out / "nanoseek"
    if not done(nano):
        grpo(GRPOConfig(model=str(sft), out=str(nano), dataset=args.task, steps=args.steps, prompts_per_step=P,
                        group_size=G, max_new_tokens=args.max_new_tokens, lr=args.grpo_lr, beta=args.beta,
                        eps_low=0.2, temperature=1.0, reward=["accuracy"], micro_batch_size=16, eval_every=0,
                        eval_size=args.eval_size, eval_samples=args.eval_samples, sample_every=0,
                        num_train=num_train, seed=args.seed, progress=False))
    rows, before, after, _ = grpo_log(nano)
    trl = run_trl(sft, out / "trl", examples, dict(prompts_per_step=P, group_size=G, lr=args.grpo_lr,
                                                  max_new_tokens=args.max_new_tokens, beta=args.beta, eps=0.2,
                                                  temperature=1.0, seed=args.seed, threads=torch.get_num_threads()))
    # TRL's model, evaluated exactly as nanoseek's GRPO evaluated its own (HeldOut: same examples, seed, k)
    trl_after = evaluate_accuracy(load_pretrained(out / "trl" / "model", dtype=torch.float32),
                                  Tokenizer.from_pretrained(out / "trl" / "model"), None,
                                  max_new_tokens=args.max_new_tokens, layout="chat", k=args.eval_samples,
                                  temperature=0.6, top_p=0.95, seed=args.seed, examples=held, progress=False)
    n_steps = len(rows)
    sides = {
        "nanoseek": {"steps": n_steps, "s_per_step": rows[-1]["elapsed_s"] / n_steps,
                     "s_per_step_median": statistics.median(
                         b["elapsed_s"] - a["elapsed_s"] for a, b in zip([{"elapsed_s": 0.0}] + rows, rows)),
                     "rollout_tokens_per_s": sum(r["rollout_tokens"] for r in rows) / sum(r["rollout_s"] for r in rows),
                     "rollout_s_per_step": statistics.mean(r["rollout_s"] for r in rows),
                     "reward_mean": statistics.mean(r["reward_mean"] for r in rows),
                     "pass@1_before": before["eval/pass@1"], "pass@1_after": after["eval/pass@1"],
                     "stderr_after": after.get("eval/stderr")},
        "trl": {"steps": trl["steps"], "s_per_step": sum(trl["step_s"]) / trl["steps"],
                "s_per_step_median": statistics.median(trl["step_s"]),
                "rollout_tokens_per_s": sum(trl["rollout_tokens"]) / sum(trl["rollout_s"]),
                "rollout_s_per_step": statistics.mean(trl["rollout_s"]),
                "reward_mean": statistics.mean(trl["reward"]), "threads": trl["threads"],
                "pass@1_before": before["eval/pass@1"], "pass@1_after": trl_after["pass@1"],
                "stderr_after": trl_after["stderr"]}}
    for side in sides.values():
        side["gain_points"] = 100 * (side["pass@1_after"] - side["pass@1_before"])
    n, t = sides["nanoseek"], sides["trl"]
    results.update(sides, stderr_before=before.get("eval/stderr"), steps=args.steps,
                   ratios={"steps_per_s": t["s_per_step"] / n["s_per_step"],
                           "rollout_tokens_per_s": n["rollout_tokens_per_s"] / t["rollout_tokens_per_s"],
                           "gain_points_difference": n["gain_points"] - t["gain_points"]},
                   settings={"prompts_per_step": P, "group_size": G, "max_new_tokens": args.max_new_tokens,
                             "lr": args.grpo_lr, "beta": args.beta, "eps": 0.2, "temperature": 1.0, "mu": 1,
                             "loss": "grpo, group-scaled advantages", "reward": "accuracy",
                             "sft_steps": args.sft_steps})
    return results


def markdown_vs_trl(r: dict) -> str:
    n, t, q = r["nanoseek"], r["trl"], r["ratios"]
    pct = (lambda x: f"{100 * x:.1f}%")
    row = (lambda name, s: f"| {name} | {pct(s['pass@1_after'])} ± {100 * s['stderr_after']:.1f} | "
           f"{s['gain_points']:+.1f} | {s['s_per_step']:.2f} (median {s['s_per_step_median']:.2f}) | "
           f"{s['rollout_s_per_step']:.2f} | {s['rollout_tokens_per_s']:,.0f} | {s['reward_mean']:.3f} |")
    return "\n".join([
        f"## nanoseek GRPO beside TRL's GRPOTrainer ({r['steps']} steps, built-in {r['task']})", "",
        f"Command: `{r['command']}`  ", f"Machine: {r['machine']}", f"Settings: {r['settings']}", "",
        f"Held-out pass@1 of the shared SFT checkpoint: {pct(n['pass@1_before'])} ± "
        f"{100 * (r['stderr_before'] or 0):.1f} ({r['eval_size']} problems x k={r['eval_samples']}, T 0.6, "
        "top-p 0.95).",
        "", "| | pass@1 after ± s.e. | gain (points) | s/step | rollout s/step | rollout tokens/s | mean reward |",
        "|---|---|---|---|---|---|---|", row("nanoseek", n), row("TRL GRPOTrainer", t), "",
        f"nanoseek/TRL: {q['steps_per_s']:.2f}x the steps per second, {q['rollout_tokens_per_s']:.2f}x the rollout "
        f"tokens/s; pass@1 gain difference {q['gain_points_difference']:+.1f} points.", ""])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench_rl", help="folder for every stage and the results")
    p.add_argument("--task", default="arithmetic", help="built-in task (arithmetic, countdown, mixed)")
    p.add_argument("--sft-steps", type=int, default=600, help="cold-start SFT steps (8 rows of 512 tokens each)")
    p.add_argument("--student-sft-steps", type=int, default=600, help="the smaller student's cold-start SFT steps")
    p.add_argument("--grpo-minutes", type=float, default=15.0,
                   help="GRPO budget for the teacher in CPU minutes of this process (evaluations not counted): at "
                        "most that many wall-clock minutes on 2 dedicated cores, however busy this machine is")
    p.add_argument("--grpo-lr", type=float, default=3e-5, help="GRPO learning rate")
    p.add_argument("--reward", nargs="+", default=["accuracy"],
                   help="GRPO rewards (the cold start already writes the format; a small format reward's "
                        "differences, scaled up by the group std, mostly add noise)")
    p.add_argument("--beta", type=float, default=0.04, help="GRPO KL coefficient")
    p.add_argument("--prompts-per-step", type=int, default=8, help="GRPO prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="GRPO G")
    p.add_argument("--max-new-tokens", type=int, default=160, help="generation budget")
    p.add_argument("--eval-size", type=int, default=100, help="held-out problems")
    p.add_argument("--eval-samples", type=int, default=2, help="k samples per held-out problem")
    p.add_argument("--eval-every", type=int, default=50, help="GRPO held-out evaluation every N steps")
    p.add_argument("--distill-prompts", type=int, default=2000, help="prompts the teacher answers for distillation")
    p.add_argument("--distill-steps", type=int, default=150, help="student SFT steps on the teacher's traces")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads; on an oversubscribed machine 1 is far faster (OpenMP threads wait for cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vs-trl", action="store_true", help="nanoseek beside TRL's GRPOTrainer (see the docstring)")
    p.add_argument("--steps", type=int, default=50, help="--vs-trl: GRPO steps on each side")
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks every stage runs, figures meaningless")
    args = p.parse_args()
    if args.quick:
        args.sft_steps, args.student_sft_steps, args.grpo_minutes, args.eval_size, args.eval_samples = 4, 4, 0.2, 8, 1
        args.distill_prompts, args.distill_steps, args.max_new_tokens, args.eval_every = 8, 2, 32, 0
        args.prompts_per_step, args.group_size = 2, 4
    torch.set_num_threads(min(args.threads, os.cpu_count() or 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"command": " ".join(["python"] + sys.argv), "machine": f"{platform.processor() or platform.machine()}, "
                     f"{os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
                     "task": args.task,
                     "eval_size": args.eval_size, "eval_samples": args.eval_samples}
    t_all = time.perf_counter()
    if args.vs_trl:
        versus_trl(args, out, results)
        return write_results(out / "vs_trl.json", out / "VS_TRL.md", results, t_all, markdown_vs_trl)

    # 1-2. the teacher: cold start, then GRPO (its metrics hold the held-out evaluations at start and end)
    sft = cold_start(out / "sft", args.task, args.sft_steps, {}, None, args.seed)
    teacher = run_grpo(out / "grpo", sft, args.task, args.grpo_minutes, args)
    steps, before, after, curve = grpo_log(teacher)
    results["grpo"] = {"pass@1_before": before["eval/pass@1"], "pass@1_after": after["eval/pass@1"],
                       "gain_points": 100 * (after["eval/pass@1"] - before["eval/pass@1"]), "steps": len(steps),
                       "minutes": steps[-1]["elapsed_s"] / 60, "cpu_minutes": steps[-1]["cpu_s"] / 60,
                       "before": before, "after": after, "curve": curve,
                       "sft_minutes": json.loads((sft / "metrics.jsonl").read_text().splitlines()[-1])["elapsed_s"] / 60}

    # 3. throughput: rollouts inside GRPO vs the engine alone on the same batch shape
    results["throughput"] = {
        "rollout_tokens_per_s": statistics.median(r["rollout_tokens_per_s"] for r in steps),
        "step_tokens_per_s": statistics.median(r["rollout_tokens"] / (r["rollout_s"] + r["update_s"]) for r in steps),
        "plain_decode": plain_decode(teacher, args.task, args.prompts_per_step, args.group_size, args.max_new_tokens)}

    # 4. a smaller student: distilled from the GRPO teacher vs GRPO alone, same CPU time
    small = {"num_hidden_layers": 2}  # half the depth; a narrower one learns nothing in this budget
    student_base = cold_start(out / "student_sft", args.task, args.student_sft_steps, small, sft, args.seed)
    distilled = out / "student_distill"
    if not done(distilled):
        # (raises ValueError when the teacher solves nothing, as after --quick's few steps)
        distill(DistillConfig(teacher=str(teacher), out=str(distilled), student=str(student_base), dataset=args.task,
                              num_prompts=args.distill_prompts, samples_per_prompt=4, max_new_tokens=args.max_new_tokens,
                              eval_size=args.eval_size, eval_samples=args.eval_samples,
                              train=TrainConfig(steps=args.distill_steps, batch_size=8, micro_batch_size=8, lr=1e-3,
                                                warmup_steps=5, seed=args.seed)))
    summary = json.loads((distilled / "distill.json").read_text())
    wall = summary["traces"]["cpu_seconds"] + summary["train_cpu_seconds"]  # teacher sampling + student SFT
    student_rl = run_grpo(out / "student_grpo", student_base, args.task, wall / 60, args)
    _, rl_before, rl_after, _ = grpo_log(student_rl)
    results["student"] = {"params": load_pretrained(student_base).num_params(), "cpu_minutes": wall / 60,
                          "base": summary["pass@1_before"], "distilled": summary["pass@1_after"],
                          "grpo_alone": rl_after["eval/pass@1"], "grpo_alone_start": rl_before["eval/pass@1"],
                          "traces": summary["traces"]}
    results["teacher_params"] = load_pretrained(teacher).num_params()
    return write_results(out / "results.json", out / "RESULTS_rl.md", results, t_all, markdown)


def write_results(json_path: Path, md_path: Path, results: dict, t_all: float, render) -> int:
    """Record the run's total time, write its JSON and its Markdown report, print the report."""
    results["total_minutes"] = (time.perf_counter() - t_all) / 60
    json_path.write_text(json.dumps(results, indent=1))
    report = render(results)
    md_path.write_text(report)
    print(report)
    return 0


def markdown(r: dict) -> str:
    g, t, s = r["grpo"], r["throughput"], r["student"]
    pct = (lambda x: f"{100 * x:.1f}%")
    return "\n".join([
        "## GRPO and distillation (tiny preset, built-in " + r["task"] + ")", "",
        f"Command: `{r['command']}`  ", f"Machine: {r['machine']} (shared)", "",
        "| | held-out pass@1 (T=0.6, top-p 0.95) |", "|---|---|",
        f"| tiny after cold-start SFT | {pct(g['pass@1_before'])} |",
        f"| + GRPO, {g['steps']} steps, {g['cpu_minutes']:.1f} CPU-min ({g['minutes']:.1f} min wall, shared) | "
        f"{pct(g['pass@1_after'])} "
        f"(**{g['gain_points']:+.1f} points**) |", "",
        f"Rollout throughput during GRPO: {t['rollout_tokens_per_s']:,.0f} completion tokens/s "
        f"(whole step incl. update: {t['step_tokens_per_s']:,.0f}); the engine's plain batched decode of the "
        f"same batch ({t['plain_decode']['batch']} sequences, T=1) on the same weights: "
        f"{t['plain_decode']['tokens_per_s']:,.0f} tokens/s (medians).", "",
        f"Student ({s['params']:,} parameters vs the teacher's {r['teacher_params']:,}): its own cold-start SFT "
        f"(same data and tokenizer), then {s['cpu_minutes']:.1f} CPU-minutes of either (teacher sampling + SFT "
        f"for distillation):", "",
        "| student | held-out pass@1 |", "|---|---|",
        f"| cold start only | {pct(s['base'])} |",
        f"| distilled from the GRPO teacher ({s['traces']['kept']} rejection-sampled traces) | "
        f"{pct(s['distilled'])} |",
        f"| GRPO alone | {pct(s['grpo_alone'])} |", "",
        f"Held-out: {r['eval_size']} test problems x k={r['eval_samples']} samples. Pass@1 curve of the teacher's "
        f"GRPO (step, pass@1): {', '.join(f'({a}, {100 * b:.0f}%)' for a, b in g['curve'])}.", ""])


if __name__ == "__main__":
    sys.exit(main())
