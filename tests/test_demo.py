"""`nanoseek demo --quick`: end to end, interrupted and resumed, and its report read back against the run."""

import json
import re
from pathlib import Path

import pytest
import torch

from nanoseek import cli
from nanoseek.demo import report, stages
from nanoseek.demo.config import DemoConfig
from nanoseek.demo.run import STATE_FILE, run_demo

SECTIONS = ["## Time per stage", "## Tokenizer and models", "## Pretraining and SFT: loss",
            "## Expert load: auxiliary-loss-free balancing",
            "## Reasoning accuracy: pass@1 before and after GRPO (held-out)",
            "## R1-Zero: GRPO straight from the pretrained base", "## Distilled vs RL-only student",
            "## int8 quantization vs full precision", "## Inference: MLA cache and MTP speculative decoding",
            "## Sample answers with their reasoning"]
FIGURES = ["stage_times", "loss", "balance", "expert_load", "accuracy", "grpo", "r1_zero", "students", "quant",
           "inference"]


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run the quick demo, cut off in its last stage; then run it again and record what ran."""
    out = tmp_path_factory.mktemp("demo")
    original = list(stages.STAGES)
    last = original[-1]

    def interrupt(ctx):
        raise Interrupted("simulated interruption")

    mp = pytest.MonkeyPatch()
    mp.setattr(stages, "STAGES", original[:-1] + [stages.Stage(last.name, last.title, interrupt)])
    with pytest.raises(Interrupted):
        cli.main(["demo", "--quick", "--out", str(out)])
    before = json.loads((out / STATE_FILE).read_text())
    report_before = (out / "report.md").exists()

    called = []

    def counting(stage):
        def fn(ctx):
            called.append(stage.name)
            return stage.fn(ctx)
        return stages.Stage(stage.name, stage.title, fn)

    mp.setattr(stages, "STAGES", [counting(s) for s in original])
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    mp.undo()
    after = json.loads((out / STATE_FILE).read_text())
    return {"out": out, "before": before, "after": after, "called": called, "report_before": report_before,
            "last": last.name, "names": [s.name for s in original]}


def test_interrupted_demo_resumes_at_the_unfinished_stage(demo, capsys):
    before, after = demo["before"], demo["after"]
    assert list(before["stages"]) == demo["names"][:-1]  # every stage but the interrupted one finished
    assert not demo["report_before"]
    assert demo["called"] == [demo["last"]]  # the second run only ran the missing stage
    for name, entry in before["stages"].items():
        assert after["stages"][name] == entry  # finished stages kept as they were
    assert all(after["stages"][n]["status"] == "done" for n in demo["names"])


def test_report_has_every_section_and_plot(demo):
    out = demo["out"]
    text = (out / "report.md").read_text()
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    assert text.count("Paper: ") >= 7  # each effect beside what the DeepSeek paper reports
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(Path(i).stem for i in images) == sorted(FIGURES)
    for rel in images:
        data = (out / rel).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, rel


def _table_row(text: str, section: str, first_cell: str) -> list[str]:
    """The cells of the row starting with `first_cell` in the first table under `section`."""
    for line in text[text.index(section):].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r}")


def test_report_figures_come_from_the_run(demo):
    out, state = demo["out"], demo["after"]
    results = {n: s["result"] for n, s in state["stages"].items()}
    text = (out / "report.md").read_text()
    cfg = DemoConfig.quick()

    # the vision stage's held-out accuracy, as measured
    vis = results["vision"]
    assert _table_row(text, "## Vision", "after")[1] == f"{100 * vis['accuracy_after']['all']:.1f}%"

    # accuracy rows: the numbers measured by the evaluate stage on the held-out split
    for name in ("pretrain", "sft", "grpo"):
        ev = results["evaluate"][name]
        assert ev["n"] == cfg.eval_examples and ev["pass@1"] == ev["correct"] / ev["n"]
        row = _table_row(text, "## Reasoning accuracy", name)
        assert row[1] == f"{100 * ev['pass@1']:.1f}%" and row[2] == f"{ev['correct']} / {ev['n']}"
    assert results["evaluate"]["grpo"] == results["grpo"]["eval"]

    # training figures: the last row of the stage's own metrics.jsonl
    rows = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == cfg.pretrain_steps == results["pretrain"]["steps"]
    assert f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}" in text

    # cache bytes: the teacher's own config; int8 row: the quantize stage's measurements
    mcfg = json.loads((out / "grpo" / "config.json").read_text())
    mla = (mcfg["kv_lora_rank"] + mcfg["qk_rope_head_dim"]) * mcfg["num_hidden_layers"] * 2
    assert results["inference"]["cache"]["mla_bytes_per_token"] == mla
    assert f"Latent cache: {mla:,} bytes/token" in text
    int8 = results["quantize"]["formats"]["int8"]
    assert _table_row(text, "## int8", "int8")[2] == f"{int8['held_out_loss']:.4f}"

    # re-rendered from changed results, the report changes with them: nothing is a constant
    state["stages"]["evaluate"]["result"]["sft"].update({"pass@1": 0.625, "correct": 10})
    other = out / "rerender"
    other.mkdir()
    (other / "pretrain").symlink_to(out / "pretrain")
    changed = report.write_report(other, state).read_text()
    assert _table_row(changed, "## Reasoning accuracy", "sft")[1:3] == ["62.5%", f"10 / {cfg.eval_examples}"]


def test_r1_zero_stage_writes_its_plot_and_its_numbers(demo):
    """GRPO from the R1-Zero base (pretrain/ pretrained further, mostly on one-line answers) in the text
    layout with accuracy + format: its numbers are its own metrics' first and last steps, its plot is
    written beside them, and the report quotes both, with the base's corpus."""
    import statistics

    from nanoseek.plots import read_metrics
    out, r = demo["out"], demo["after"]["stages"]["r1_zero"]["result"]
    rows = [x for x in read_metrics(out / "r1_zero" / "metrics.jsonl") if "reward_mean" in x]
    assert r["steps"] == len(rows) == DemoConfig.quick().r1_zero_steps
    assert r["layout"] == "text" and r["reward"] == ["accuracy", "format=0.1"]
    assert r["accuracy_first"] == statistics.mean(x["accuracy"] for x in rows[:5])
    assert r["response_length_last"] == statistics.mean(x["response_length"] for x in rows[-5:])
    assert r["sampled_pass@1_start"] is not None and r["sampled_stderr_end"] is not None
    for png in (out / "r1_zero" / "r1_zero.png", out / "figures" / "r1_zero.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    assert (f"mean response length {r['response_length_first']:.1f} -> {r['response_length_last']:.1f} tokens"
            in text)
    assert f"greedy after: {100 * r['eval']['pass@1']:.1f}%" in text
    base = demo["after"]["stages"]["r1_zero_base"]["result"]  # the base it starts from, and its corpus
    assert base["steps"] == DemoConfig.quick().r1_zero_base_steps and base["eval"]["layout"] == "text"
    assert f"{100 * base['direct_fraction']:.1f}% of the documents state the result in one line" in text
    assert f"greedy: {base['eval']['mean_response_tokens']:.0f} tokens" in text
    g = demo["after"]["stages"]["grpo"]["result"]  # the RL stage's gain is shown with its interval
    assert f"{100 * g['sampled_pass@1_start']:.1f}% ± {100 * g['sampled_stderr_start']:.1f} -> " in text
    gain = 100 * (g["sampled_pass@1_end"] - g["sampled_pass@1_start"])
    se = 100 * (g["sampled_stderr_start"] ** 2 + g["sampled_stderr_end"] ** 2) ** 0.5
    assert f"95% interval [{gain - 1.96 * se:+.1f}, {gain + 1.96 * se:+.1f}]" in text
    grpo_rows = [x for x in read_metrics(out / "grpo" / "metrics.jsonl") if "reward_mean" in x]
    assert g["no_signal_groups"] == statistics.mean(x["no_signal_groups"] for x in grpo_rows)
    # the demo's GRPO drops no-signal groups (dynamic sampling) and says how many, from its own metrics
    assert g["zero_signal_rate"] == statistics.mean(x["dynamic/zero_signal_rate"] for x in grpo_rows)
    assert f"on average {100 * g['zero_signal_rate']:.1f}% of the groups sampled" in text
    assert f"rolled out {g['resample_rounds']:.2f} extra rounds" in text


def test_samples_show_reasoning_and_next_commands(demo, capsys):
    samples = demo["after"]["stages"]["samples"]["result"]["samples"]
    assert len(samples) == DemoConfig.quick().samples
    text = (demo["out"] / "report.md").read_text()
    for s in samples:
        assert f"**{s['prompt']}**" in text
    # the resumed run printed the commands to try next, on a model folder that exists
    run_demo(demo["out"], DemoConfig.quick())  # everything finished: only the report and the hints
    printed = capsys.readouterr().out
    model = re.search(r"nanoseek chat --model (\S+)", printed).group(1)
    assert Path(model, "config.json").exists() and f"nanoseek serve --model {model}" in printed
    assert "finished earlier" in printed


def test_the_student_is_a_qwen2_checkpoint_transformers_runs_alike(demo):
    """The student the demo distills into (its pretrained base here: --quick's teacher solves nothing,
    so nothing is distilled) is a standard Qwen2 checkpoint: transformers loads it and decodes alike."""
    import transformers

    from nanoseek.hf import load_pretrained
    from nanoseek.inference import Engine
    path = demo["out"] / ("student_distill" if (demo["out"] / "student_distill" / "config.json").exists()
                          else "student")
    ours = load_pretrained(path, dtype=torch.float32)
    assert ours.config.model_type == "qwen2"
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = [[5, 6, 7, 8, 9]]
    with torch.no_grad():
        want = ref.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                            pad_token_id=0)[0, 5:].tolist()
    assert Engine(ours).generate(prompt, 8)[0].tokens == want


def test_resume_with_other_sizes_is_refused(demo):
    with pytest.raises(ValueError, match="was started with"):
        run_demo(demo["out"], DemoConfig.full())


def test_a_demo_started_before_a_stage_was_added_resumes(demo):
    """state.json from an older nanoseek lacks the new stage's sizes: the run resumes (nothing finished
    used them), with the config completed."""
    path = demo["out"] / STATE_FILE
    state = json.loads(path.read_text())
    del state["config"]["r1_zero_steps"]
    path.write_text(json.dumps(state))
    resumed = run_demo(demo["out"], DemoConfig.quick())
    assert resumed["config"]["r1_zero_steps"] == DemoConfig.quick().r1_zero_steps
    assert resumed["stages"] == state["stages"]  # every finished stage kept


def test_corrupt_state_file_is_named(tmp_path):
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=STATE_FILE):
        run_demo(tmp_path, DemoConfig.quick())
