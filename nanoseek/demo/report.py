"""DIR/report.md and DIR/figures/*.png: the demo's report card, each figure beside the paper's.

    write_report("runs/demo", state)     # state: DIR/state.json as the runner keeps it

Every number in the report is read from state.json (the stages' results) or from the stages'
metrics.jsonl files; the only constants here are what the DeepSeek papers report, quoted with
the paper and section they come from. Figures use matplotlib's Agg canvas (nanoseek.plots).
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from ..hf.fsutil import atomic_write_text
from ..plots import plot_expert_load, plot_r1_zero, read_metrics, save_png

DPI = 100  # the report's figures: smaller files than the training plots

# What the papers report for each effect the demo reproduces in miniature.
PAPER = {
    "cache": "DeepSeek-V2 (arXiv 2405.04434, §1 and §3.2): MLA cuts the KV cache by 93.3% against "
             "DeepSeek 67B (multi-head attention) and raises maximum generation throughput 5.76x.",
    "mtp": "DeepSeek-V3 (arXiv 2412.19437, §5.4.3): the second token predicted by MTP is accepted 85-90% "
           "of the time, which decodes 1.8x more tokens per second.",
    "balance": "DeepSeek-V3 (§2.1.2): auxiliary-loss-free balancing adds a per-expert bias to the routing "
               "scores only, nudged by γ = 0.001 per step toward under-loaded experts; the ablation in §4.5.2 "
               "finds it better than auxiliary-loss balancing, with more specialised experts.",
    "mtp_loss": "DeepSeek-V3 (§2.2, §4.2): the MTP loss is weighted λ = 0.3 for the first 10T tokens, then 0.1.",
    "grpo": "DeepSeek-R1 (arXiv 2501.12948, §2.2.4): RL alone takes DeepSeek-R1-Zero from 15.6% to 71.0% "
            "pass@1 on AIME 2024, and the average response length grows steadily during RL. GRPO itself is "
            "from DeepSeekMath (arXiv 2402.03300, §4.1).",
    "r1_zero": "DeepSeek-R1 (§2.2.4, Figures 2 and 3): during RL straight from the base model with "
               "accuracy and format rewards, DeepSeek-R1-Zero's AIME 2024 accuracy rises from 15.6% to 71.0% while "
               "the average response length on the training set grows steadily, from hundreds to thousands of "
               "tokens: the model learns to spend more thinking on a problem.",
    "distill": "DeepSeek-R1 (§4.1, Table 6): on Qwen-32B, distillation from R1 reaches 72.6% AIME 2024 pass@1 "
               "against 47.0% for large-scale RL on the same base (DeepSeek-R1-Zero-Qwen-32B).",
    "quant": "DeepSeek-V3 (§3.3) trains in FP8 with a relative loss error below 0.25% against BF16 and ships "
             "FP8 weights; the papers report no int8 inference figure, so the closest claim is that weights "
             "at 8 bits keep the model's quality.",
}
PAPER_MTP_ACCEPTANCE = (0.85, 0.90)
PAPER_MTP_SPEEDUP = 1.8
PAPER_CACHE_REDUCTION = 0.933
PAPER_R1_ZERO_AIME = (15.6, 71.0)
PAPER_DISTILL_AIME = {"RL only": 47.0, "distilled": 72.6}


def _figure(w: float = 6.4, h: float = 3.6, cols: int = 1):
    fig = Figure(figsize=(w, h), layout="constrained")
    return fig, fig.subplots(1, cols)


def _bars(ax, labels, values, fmt="{:.2f}", color=None):
    bars = ax.bar(range(len(values)), values, color=color)
    ax.set_xticks(range(len(values)), labels, fontsize="small")
    for b, v in zip(bars, values):
        ax.annotate(fmt.format(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                    fontsize="small")
    return bars


def _result(state: dict, name: str) -> dict | None:
    entry = state["stages"].get(name, {})
    return entry.get("result") if entry.get("status") == "done" else None


def _missing(name: str) -> str:
    return f"_Stage `{name}` has not run._"


# ----------------------------------------------------------------------------- figures

def fig_stage_times(state: dict, path: Path) -> Path:
    names = list(state["stages"])
    fig, ax = _figure(7, 0.35 * len(names) + 1.2)
    secs = [state["stages"][n]["seconds"] for n in names]
    ax.barh(range(len(names)), secs)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(f"time per stage (total {sum(secs):.0f}s)")
    return save_png(fig, path, dpi=DPI)


def fig_losses(out: Path, path: Path) -> Path | None:
    runs = [(n, out / n / "metrics.jsonl") for n in ("pretrain", "sft", "student", "student_distill")]
    runs = [(n, read_metrics(p)) for n, p in runs if p.exists()]
    if not runs:
        return None
    fig, axes = _figure(11, 3.6, cols=2)
    for name, rows in runs:
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["loss"] for r in rows], label=f"{name}")
        mtp = [(r["step"], r["mtp_loss"]) for r in rows if r.get("mtp_loss") is not None]
        if mtp:
            axes[0].plot(*zip(*mtp), ls="--", alpha=0.7, label=f"{name} MTP (next-next token)")
        axes[1].plot(steps, [r["tokens_per_s"] for r in rows], label=name)
    axes[0].set_yscale("log")
    axes[0].set_title("training loss (next token; dashed: MTP depth 1)")
    axes[1].set_title("training tokens/s")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize="x-small")
    return save_png(fig, path, dpi=DPI)


def fig_balance(out: Path, path_lines: Path, path_heat: Path) -> list[Path]:
    metrics = out / "pretrain" / "metrics.jsonl"
    if not metrics.exists():
        return []
    rows = read_metrics(metrics)
    fig, ax = _figure(6.4, 3.6)
    layers = sorted({k for r in rows for k in (r.get("expert_load_max_mean") or {})}, key=int)
    for lid in layers:
        ax.plot([r["step"] for r in rows], [r["expert_load_max_mean"][lid] for r in rows], label=f"layer {lid}")
    ax.axhline(1.0, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("max load / mean load")
    ax.set_title("pretraining: expert load, aux-loss-free bias (1 = balanced)")
    ax.legend(fontsize="x-small")
    paths = [save_png(fig, path_lines, dpi=DPI)]
    window = rows[-max(1, len(rows) // 10):]
    if window and window[-1].get("expert_load"):
        import torch
        loads = sum(torch.tensor([r["expert_load"][lid] for lid in layers], dtype=torch.float64) for r in window)
        paths.append(plot_expert_load(loads, layers, path_heat,
                                      title=f"expert load / mean, last {len(window)} pretraining steps"))
    return paths


def fig_accuracy(state: dict, path: Path) -> Path | None:
    ev = _result(state, "evaluate") or {}
    labels, values = [], []
    for key, label in (("pretrain", "pretrained\n(text layout)"), ("sft", "SFT"), ("grpo", "SFT + GRPO")):
        if ev.get(key):
            labels.append(label)
            values.append(100 * ev[key]["pass@1"])
    if not values:
        return None
    fig, axes = _figure(10, 3.6, cols=2)
    _bars(axes[0], labels, values, "{:.1f}%")
    axes[0].set_ylabel("held-out pass@1 (%)")
    axes[0].set_title("this run: greedy pass@1 on the test split")
    _bars(axes[1], ["R1-Zero\nbefore RL", "R1-Zero\nafter RL"], list(PAPER_R1_ZERO_AIME), "{:.1f}%", color="gray")
    axes[1].set_title("DeepSeek-R1: AIME 2024 pass@1")
    return save_png(fig, path, dpi=DPI)


def fig_grpo(out: Path, path: Path) -> Path | None:
    metrics = out / "grpo" / "metrics.jsonl"
    if not metrics.exists():
        return None
    rows = read_metrics(metrics)
    panels = [("reward (mean over samples)", "reward_mean"), ("training accuracy (sampled)", "accuracy"),
              ("response length (tokens)", "response_length")]
    fig, axes = _figure(13, 3.4, cols=3)
    for ax, (title, key) in zip(axes, panels):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 20 else None)
        ax.set_title(f"GRPO: {title}")
        ax.set_xlabel("step")
    return save_png(fig, path, dpi=DPI)


def fig_students(state: dict, path: Path) -> Path | None:
    labels, values = [], []
    for name, label in (("student", "student base"), ("distill", "distilled\nfrom teacher"),
                        ("student_grpo", "GRPO only")):
        r = _result(state, name)
        if r and r.get("eval"):
            labels.append(label)
            values.append(100 * r["eval"]["pass@1"])
    if not values:
        return None
    fig, axes = _figure(10, 3.6, cols=2)
    _bars(axes[0], labels, values, "{:.1f}%")
    axes[0].set_title("this run: smaller student, held-out pass@1")
    _bars(axes[1], list(PAPER_DISTILL_AIME), list(PAPER_DISTILL_AIME.values()), "{:.1f}%", color="gray")
    axes[1].set_title("DeepSeek-R1, Qwen-32B: AIME 2024 pass@1")
    return save_png(fig, path, dpi=DPI)


def fig_quant(r: dict, path: Path) -> Path:
    fmts = list(r["formats"])
    fig, axes = _figure(11, 3.4, cols=3)
    _bars(axes[0], fmts, [r["formats"][f]["held_out_loss"] for f in fmts], "{:.4f}")
    axes[0].set_title("held-out loss (chat layout)")
    _bars(axes[1], fmts, [r["formats"][f]["tokens_per_s"] for f in fmts], "{:.0f}")
    axes[1].set_title("batch-1 decode tokens/s")
    _bars(axes[2], fmts, [r["formats"][f]["weight_bytes"] / 2**20 for f in fmts], "{:.2f}")
    axes[2].set_title("weights + buffers (MiB)")
    return save_png(fig, path, dpi=DPI)


def fig_inference(r: dict, path: Path) -> Path:
    c, m = r["cache"], r["mtp"]
    fig, axes = _figure(13, 3.6, cols=3)
    _bars(axes[0], ["MHA, same width", "MLA latent"], [c["mha_bytes_per_token"], c["mla_bytes_per_token"]], "{:.0f}")
    axes[0].set_title(f"cache bytes/token (bf16): -{100 * c['reduction']:.1f}%\n"
                      f"(DeepSeek-V2: -{100 * PAPER_CACHE_REDUCTION:.1f}%)", fontsize="medium")
    acc = m["acceptance_rate"] or 0.0
    _bars(axes[1], ["this run", "DeepSeek-V3"], [100 * acc, 100 * sum(PAPER_MTP_ACCEPTANCE) / 2], "{:.0f}%",
          color=["C0", "gray"])
    axes[1].errorbar([1], [100 * sum(PAPER_MTP_ACCEPTANCE) / 2], yerr=[[2.5], [2.5]], color="k", capsize=4)
    axes[1].set_title("MTP draft acceptance rate")
    _bars(axes[2], ["this run", "DeepSeek-V3"], [m["speedup"], PAPER_MTP_SPEEDUP], "{:.2f}x", color=["C0", "gray"])
    axes[2].axhline(1.0, color="gray", ls="--", lw=0.8)
    axes[2].set_title("decode speed-up with MTP drafts")
    return save_png(fig, path, dpi=DPI)


# ----------------------------------------------------------------------------- report.md

def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _img(path: Path | None, out: Path) -> str:
    return f"![{path.stem}]({os.path.relpath(path, out)})\n" if path else ""


def write_report(out: str | Path, state: dict) -> Path:
    """Draw the figures and write DIR/report.md from `state`; returns the report's path."""
    out = Path(out)
    figs = out / "figures"
    cfg = state["config"]
    lines = ["# nanoseek demo: report card", "",
             f"Task `{cfg['task']}` (built-in, held-out split of {cfg['eval_examples']} problems), seed {cfg['seed']}. "
             "Every figure below comes from this run's state.json and metrics files; the DeepSeek papers' "
             "figures sit beside them in grey.", ""]

    for section in (_section_times, _section_models, _section_losses, _section_balance, _section_accuracy,
                    _section_r1_zero, _section_students, _section_quant, _section_inference, _section_samples,
                    _section_vision):
        lines += section(out, state, figs)

    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _section_times(out: Path, state: dict, figs: Path) -> list[str]:
    """Seconds per stage, as a table and a bar chart."""
    lines = []
    lines += ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {n} | {s['seconds']:.1f} |" for n, s in state["stages"].items()]
    lines += ["", _img(fig_stage_times(state, figs / "stage_times.png"), out)]
    return lines


def _section_models(out: Path, state: dict, figs: Path) -> list[str]:
    """The tokenizer, the teacher and the student, and one training document."""
    lines = []
    tok = _result(state, "tokenizer")
    lines += ["## Tokenizer and models", ""]
    if tok:
        t, s = tok["teacher"], tok["student"]
        lines += [f"Byte-level BPE, {tok['vocab_size']} tokens (DeepSeek-R1's special tokens included), "
                  f"{tok['bytes_per_token']:.2f} bytes/token on the corpus. Teacher: {t['params']:,} parameters "
                  f"({t['active_params']:,} active per token), {t['layers']} layers, {t['experts']} routed experts, "
                  f"MLA, one MTP module. Student: {s['params']:,} ({s['active_params']:,} active), "
                  f"{s['layers']} layers, hidden {s['hidden_size']}.", "", "A training document:", "", "```",
                  tok["example"], "```", ""]
    else:
        lines += [_missing("tokenizer"), ""]
    return lines


def _section_losses(out: Path, state: dict, figs: Path) -> list[str]:
    """Pretraining and SFT: first and last loss, tokens/s and MFU."""
    lines = []
    lines += ["## Pretraining and SFT: loss", ""]
    for name in ("pretrain", "sft"):
        r = _result(state, name)
        if r:
            mtp = f", MTP loss {r['mtp_loss']:.3f}" if r.get("mtp_loss") is not None else ""
            lines.append(f"- **{name}**: {r['steps']} steps, loss {r['first_loss']:.3f} -> {r['loss']:.3f}{mtp}, "
                         f"{r['tokens_per_s']:,.0f} tokens/s (median), MFU {_pct(r['mfu'])}"
                         + (f" ({r['via']})" if r.get("via") else ""))
        else:
            lines.append(f"- {_missing(name)}")
    lines += ["", _img(fig_losses(out, figs / "loss.png"), out), f"Paper: {PAPER['mtp_loss']}", ""]
    return lines


def _section_balance(out: Path, state: dict, figs: Path) -> list[str]:
    """Max/mean expert load per MoE layer over pretraining, and the heatmap."""
    lines = []
    lines += ["## Expert load: auxiliary-loss-free balancing", ""]
    pre = _result(state, "pretrain")
    if pre and pre.get("expert_load_max_mean"):
        first, last = pre["first_expert_load_max_mean"], pre["expert_load_max_mean"]
        lines += ["Max/mean expert load per MoE layer, first -> last pretraining step: "
                  + ", ".join(f"layer {k}: {first.get(k, float('nan')):.2f} -> {v:.2f}" for k, v in last.items()), ""]
    lines += [_img(p, out) for p in fig_balance(out, figs / "balance.png", figs / "expert_load.png")]
    lines += [f"Paper: {PAPER['balance']}", ""]
    return lines


def _section_accuracy(out: Path, state: dict, figs: Path) -> list[str]:
    """Held-out pass@1 of each teacher stage, and what GRPO changed."""
    lines = []
    lines += ["## Reasoning accuracy: pass@1 before and after GRPO (held-out)", ""]
    ev = _result(state, "evaluate")
    if ev:
        lines += ["| model | greedy pass@1 | correct / n | mean response tokens | truncated | no answer |",
                  "|---|---|---|---|---|---|"]
        for key in ("pretrain", "sft", "grpo"):
            if ev.get(key):
                e = ev[key]
                lines.append(f"| {key} | {_pct(e['pass@1'])} | {e['correct']} / {e['n']} | "
                             f"{e['mean_response_tokens']:.0f} | {_pct(e['truncated'])} | {_pct(e['unparsed'])} |")
        lines += ["", f"The final teacher ({ev['final']}) with R1's sampling (temperature 0.6, top-p 0.95): "
                  f"pass@1 {_pct(ev['sampled_pass@1'])}.", ""]
    else:
        lines += [_missing("evaluate"), ""]
    g = _result(state, "grpo")
    if g:
        lines += [f"GRPO: {g['steps']} steps in {g['train_s']:.0f}s; mean reward {g['reward_first']:.3f} -> "
                  f"{g['reward_last']:.3f}; held-out pass@1 sampled at R1's settings (temperature 0.6, top-p "
                  f"0.95), start -> end of GRPO: {_sampled_gain(g)}.", ""]
        if g.get("zero_signal_rate") is not None:
            lines += [f"Dynamic sampling (DAPO): on average {_pct(g['zero_signal_rate'])} of the groups sampled scored "
                      "the same on every sample (all right or all wrong: zero advantage) and were dropped; each step "
                      f"rolled out {g['resample_rounds']:.2f} extra rounds of fresh prompts on average to fill its "
                      "batch with groups that carry signal.", ""]
            lines += [_gain_reading(g), ""]
        elif g.get("no_signal_groups") is not None:
            lines += [f"On average {_pct(g['no_signal_groups'])} of a step's groups scored the same on every sample "
                      "(all right or all wrong): their advantages are zero, so only the rest teach anything.", ""]
    lines += [_img(fig_accuracy(state, figs / "accuracy.png"), out),
              _img(fig_grpo(out, figs / "grpo.png"), out), f"Paper: {PAPER['grpo']}", ""]
    return lines


def _gain_reading(g: dict) -> str:
    """What the measured gain says, by its size against its standard error (two of them: a real change)."""
    a, b = g.get("sampled_pass@1_start"), g.get("sampled_pass@1_end")
    sa, sb = g.get("sampled_stderr_start"), g.get("sampled_stderr_end")
    if None in (a, b, sa, sb):
        return "The gain has no standard error here (no sampled evaluation), so it cannot be read against noise."
    se = (sa ** 2 + sb ** 2) ** 0.5
    if b - a > 2 * se:
        return ("Where the gain comes from: a group teaches only when its samples disagree, so the problems that move "
                "pass@1 are those the SFT model solves sometimes; dynamic sampling spends every step on them instead "
                "of on problems it always or never solves. The SFT stage is a short cold start (as DeepSeek-R1's), "
                "which leaves many such problems; after a long SFT on this corpus of perfect worked solutions, "
                "imitation has already taken the model about as far as GRPO can, and GRPO adds little "
                "(BENCHMARKS.md, \"The demo's RL gain\").")
    return (f"This change is within two standard errors ({200 * se:.1f} points) of zero: every trained group carried "
            "signal, but at this model size that signal did not turn into held-out accuracy within the budget. "
            "BENCHMARKS.md (GRPO inside the demo, dynamic sampling) measures where a change sits by problem kind: "
            "RL polished some kinds while others got worse, and products stay out of reach (the model almost never "
            "samples a correct one, so their groups rarely hold anything to learn from).")


def _sampled_gain(g: dict) -> str:
    """"a% ± s.e. -> b% ± s.e. (gain ± s.e. points)": the difference's standard error as if the two
    evaluations were independent (they share the problems, so this overstates it a little)."""
    a, b = g.get("sampled_pass@1_start"), g.get("sampled_pass@1_end")
    sa, sb = g.get("sampled_stderr_start"), g.get("sampled_stderr_end")
    if a is None or b is None or sa is None or sb is None:
        return f"{_pct(a)} -> {_pct(b)}"
    se = 100 * (sa ** 2 + sb ** 2) ** 0.5
    gain = 100 * (b - a)
    return (f"{_pct(a)} ± {100 * sa:.1f} -> {_pct(b)} ± {100 * sb:.1f} "
            f"(**{gain:+.1f} ± {se:.1f} points**, ±1 standard error; 95% interval "
            f"[{gain - 1.96 * se:+.1f}, {gain + 1.96 * se:+.1f}])")


def _section_r1_zero(out: Path, state: dict, figs: Path) -> list[str]:
    """GRPO straight from the pretrained base: accuracy and response length over the steps."""
    lines = ["## R1-Zero: GRPO straight from the pretrained base", ""]
    r = _result(state, "r1_zero")
    metrics = out / "r1_zero" / "metrics.jsonl"
    if not r or not metrics.exists():
        return lines + [_missing("r1_zero"), ""]
    fmt = (lambda x, f="{:.1f}": "n/a" if x is None else f.format(x))
    lines += [f"GRPO from `pretrain/` with no SFT: prompts in the pretraining layout (`{{problem}}\\n<think>\\n`), "
              f"rewards {' + '.join(r['reward'])}, {r['steps']} steps in {r['train_s']:.0f}s. Means over the first "
              f"-> last 5 steps: training accuracy {_pct(r['accuracy_first'])} -> {_pct(r['accuracy_last'])}, mean "
              f"response length {fmt(r['response_length_first'])} -> {fmt(r['response_length_last'])} tokens, "
              f"format reward {fmt(r['reward/format_first'], '{:.2f}')} -> {fmt(r['reward/format_last'], '{:.2f}')}. "
              f"Held-out pass@1 at R1's settings: {_sampled_gain(r)}; greedy after: {_pct(r['eval']['pass@1'])}.",
              ""]
    base = _result(state, "r1_zero_base")
    if base:
        lines += [f"The base (`r1_zero_base/`): `pretrain/` pretrained {base['steps']} steps further on a corpus where "
                  f"{_pct(base['direct_fraction'])} of the documents state the result in one line (`417 + 85 = 502` "
                  "inside `<think>`) and the rest show the worked column-by-column steps. It mostly answers in one "
                  f"short line (greedy: {base['eval']['mean_response_tokens']:.0f} tokens, pass@1 "
                  f"{_pct(base['eval']['pass@1'])}), which a model this small gets wrong on most problems, but it "
                  "knows the longer worked form and samples it now and then.", ""]
    first, last = r["response_length_first"], r["response_length_last"]
    acc_first, acc_last = r["accuracy_first"], r["accuracy_last"]
    if first and last and acc_first is not None and acc_last is not None:
        if last >= 1.1 * first and acc_last > acc_first:
            lines += [f"Accuracy and response length rose together ({_pct(acc_first)} -> {_pct(acc_last)}, "
                      f"{first:.0f} -> {last:.0f} tokens), the effect of R1-Zero's Figure 3: the accuracy reward "
                      "favours the samples that worked the problem out step by step, so RL shifts the policy from "
                      "one-line answers to the longer worked form, which it only rarely chose before.", ""]
        else:
            lines += [f"The response length did not grow together with accuracy here ({first:.0f} -> {last:.0f} "
                      f"tokens, accuracy {_pct(acc_first)} -> {_pct(acc_last)}): within this budget RL did not move "
                      "the base toward longer worked answers.", ""]
    lines += [_img(plot_r1_zero([x for x in read_metrics(metrics) if "reward_mean" in x], figs / "r1_zero.png"), out),
              f"Paper: {PAPER['r1_zero']}", ""]
    return lines


def _section_students(out: Path, state: dict, figs: Path) -> list[str]:
    """The distilled student against the one trained by GRPO alone."""
    lines = []
    lines += ["## Distilled vs RL-only student", ""]
    for name, what in (("student", "student base (short pretraining; text layout)"),
                       ("distill", "distilled from the teacher's correct traces"),
                       ("student_grpo", "GRPO alone from the student base, same wall-clock")):
        r = _result(state, name)
        if r and r.get("skipped"):
            lines.append(f"- **{what}**: not trained -- {r['skipped']}")
        elif r:
            took = f", {r['train_s']:.0f}s" if r.get("train_s") else ""
            extra = ""
            if r.get("traces"):
                t = r["traces"]
                extra = f"; {t['kept']} traces kept of {t['samples']} teacher samples"
            if r.get("steps") is not None and name == "student_grpo":
                extra = f"; {r['steps']} GRPO steps"
            lines.append(f"- **{what}**: held-out pass@1 {_pct(r['eval']['pass@1'])}{took}{extra}")
        else:
            lines.append(f"- {_missing(name)}")
    lines += ["", _img(fig_students(state, figs / "students.png"), out), f"Paper: {PAPER['distill']}", ""]
    return lines


def _section_quant(out: Path, state: dict, figs: Path) -> list[str]:
    """int8 against fp32/bf16: accuracy, loss, decode speed, bytes."""
    lines = []
    lines += ["## int8 quantization vs full precision", ""]
    q = _result(state, "quantize")
    if q:
        lines += [f"Model: {q['model']}, int8 per-channel weight-only (nanoseek.quant), router gates, embeddings "
                  "and kv_b_proj kept in full precision.", "",
                  "| format | held-out pass@1 | held-out loss | batch-1 decode tokens/s (median) | weight bytes | "
                  "greedy output = fp32 |", "|---|---|---|---|---|---|"]
        lines += [f"| {f} | {_pct(r.get('pass@1'))} | {r['held_out_loss']:.4f} | {r['tokens_per_s']:.1f} | "
                  f"{r['weight_bytes']:,} | {r['same_greedy_output_as_fp32']} |" for f, r in q["formats"].items()]
        lines += ["", f"int8 decodes {q['int8_speedup_vs_fp32']:.2f}x as fast as fp32 and "
                  f"{q['int8_speedup_vs_bf16']:.2f}x as fast as bf16 on this machine.", "",
                  _img(fig_quant(q, figs / "quant.png"), out)]
    else:
        lines += [_missing("quantize"), ""]
    lines += [f"Paper: {PAPER['quant']}", ""]
    return lines


def _section_inference(out: Path, state: dict, figs: Path) -> list[str]:
    """Latent-cache bytes per token and MTP speculative decoding."""
    lines = []
    lines += ["## Inference: MLA cache and MTP speculative decoding", ""]
    inf = _result(state, "inference")
    if inf:
        c, m = inf["cache"], inf["mtp"]
        lines += [f"- Latent cache: {c['mla_bytes_per_token']:,} bytes/token (bf16) against "
                  f"{c['mha_bytes_per_token']:,} for multi-head attention of the same width: "
                  f"-{100 * c['reduction']:.1f}%. At DeepSeek-V3's shape (computed): "
                  f"{c['deepseek_v3_mla_bytes_per_token']:,} vs {c['deepseek_v3_mha_bytes_per_token']:,} bytes/token.",
                  f"- MTP self-speculative decoding ({inf['model']}, greedy, batch 1, {m['tokens']} tokens): "
                  f"acceptance {_pct(m['acceptance_rate'])}, {m['tokens_per_forward']:.2f} tokens per forward, "
                  f"{m['plain_tokens_per_s']:.1f} -> {m['mtp_tokens_per_s']:.1f} tokens/s ({m['speedup']:.2f}x); "
                  f"output identical to plain decoding: {m['same_output']}.", "",
                  _img(fig_inference(inf, figs / "inference.png"), out),
                  f"Paper: {PAPER['cache']}", "", f"Paper: {PAPER['mtp']}", ""]
    else:
        lines += [_missing("inference"), ""]
    return lines


def _section_samples(out: Path, state: dict, figs: Path) -> list[str]:
    """A few held-out answers with their reasoning."""
    lines = []
    lines += ["## Sample answers with their reasoning", ""]
    smp = _result(state, "samples")
    if smp:
        for s in smp["samples"]:
            mark = "correct" if s["correct"] else f"wrong, expected {s['expected']}"
            lines += [f"**{s['prompt']}** ({mark})", "", "```", "<think>", s["reasoning"].strip(), "</think>",
                      s["answer"].strip(), "```", ""]
    else:
        lines += [_missing("samples"), ""]
    return lines


def _section_vision(out: Path, state: dict, figs: Path) -> list[str]:
    """Held-out accuracy of the tiny VL model on the shapes task, before and after training."""
    lines = ["## Vision: the synthetic shapes task", ""]
    r = _result(state, "vision")
    if not r:
        return lines + [_missing("vision"), ""]
    before, after = r["accuracy_before"], r["accuracy_after"]
    lines += [f"A tiny DeepSeek-VL-style model (SigLIP + SAM-B towers, hybrid aligner, 2-layer Llama) trained "
              f"from scratch for {r['steps']} steps ({r['train_seconds']:.0f} s); held-out exact-match accuracy:", "",
              "| | all | colour | kind | count |", "|---|---|---|---|---|",
              "| before | " + " | ".join(_pct(before.get(k, 0)) for k in ("all", "colour", "kind", "count")) + " |",
              "| after | " + " | ".join(_pct(after.get(k, 0)) for k in ("all", "colour", "kind", "count")) + " |",
              "", f"Majority-answer baseline: {_pct(r['majority_baseline'])}.", ""]
    return lines
