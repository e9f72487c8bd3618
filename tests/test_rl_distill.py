"""Distillation: rejection sampling keeps only correct, well-formed, finished, distinct teacher traces;
students are built from presets (MoE or dense, resized) on the teacher's tokenizer; the SFT and the
logit-KL paths run end to end and write a checkpoint and distill.json."""

import json

import pytest
from conftest import arithmetic_checkpoint

from nanoseek.hf import load_pretrained
from nanoseek.cli import main
from nanoseek.config import ModelConfig
from nanoseek.data.tasks import get_task
from nanoseek.inference import Completion
from nanoseek.rl import distill as distill_module
from nanoseek.rl.distill import DistillConfig, build_student, distill, rejection_sample
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.loop import TrainConfig


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    return arithmetic_checkpoint(path)


class CannedEngine:
    """Stands in for the teacher's Engine: returns fixed completions (ids) and finish reasons."""

    def __init__(self, tokenizer, texts, reasons):
        self.outs = [Completion(tokenizer.encode(t), why) for t, why in zip(texts, reasons)]
        self.stats = {}

    def generate(self, prompts, max_new_tokens, **kw):
        assert len(prompts) == len(self.outs)
        return self.outs


def test_rejection_sampling_keeps_only_correct_finished_distinct_traces(teacher):
    tok = Tokenizer.from_pretrained(teacher)
    ex = get_task("arithmetic").examples("train", 1, seed=5)[0]
    right = f"{ex.reasoning}\n</think>\n\n<answer>{ex.answer}</answer>"
    texts = [right, right, f"x\n</think>\n\n<answer>{ex.answer}1</answer>",  # duplicate, wrong
             f"<answer>{ex.answer}</answer>",  # right answer, no reasoning: bad format
             right]  # right but cut off by the length limit
    engine = CannedEngine(tok, texts, ["stop", "stop", "stop", "stop", "length"])
    traces, stats = rejection_sample(engine, tok, [ex], 5, traces_per_prompt=3, max_new_tokens=8,
                                     temperature=0.6, top_p=0.95, progress=False)
    assert stats == {"prompts": 1, "samples": 5, "correct": 3, "kept": 1, "prompts_covered": 1}
    (trace,) = traces
    assert trace[0] == {"role": "user", "content": ex.prompt}
    assert trace[1]["content"] == f"<answer>{ex.answer}</answer>" and trace[1]["reasoning_content"] == ex.reasoning


def test_students_from_presets(teacher):
    tok = Tokenizer.from_pretrained(teacher)
    moe = build_student(DistillConfig(teacher=str(teacher), out="o", student_layers=2, student_hidden_size=64), tok)
    dense = build_student(DistillConfig(teacher=str(teacher), out="o", student_layers=2, dense=True), tok)
    assert moe.config.vocab_size == tok.vocab_size and moe.config.num_hidden_layers == 2 and moe.moe_layers()
    assert not dense.moe_layers() and dense.config.hidden_size == ModelConfig.preset("tiny").hidden_size
    qwen = build_student(DistillConfig(teacher=str(teacher), out="o",
                                       student="qwen2:hidden=64,layers=2,heads=4,kv_heads=2,inter=128"), tok)
    assert qwen.config.model_type == "qwen2" and qwen.config.num_key_value_heads == 2
    assert qwen.config.vocab_size == tok.vocab_size and not qwen.moe_layers()
    with pytest.raises(ValueError, match="student"):
        DistillConfig(teacher=str(teacher), out="o", student="no-such-preset")
    with pytest.raises(ValueError, match="kl"):
        DistillConfig(teacher=str(teacher), out="o", kl="sideways")


def _gold_traces(engine, tokenizer, examples, *args, **kw):
    """Rejection sampling stand-in: the task's worked solutions play the teacher's correct traces."""
    traces = [ex.messages() for ex in examples]
    n = len(examples)
    return traces, {"prompts": n, "samples": n, "correct": n, "kept": n, "prompts_covered": n}


@pytest.mark.parametrize("kl", [None, "forward"])
def test_distill_end_to_end(teacher, tmp_path, monkeypatch, kl):
    monkeypatch.setattr(distill_module, "rejection_sample", _gold_traces)
    cfg = DistillConfig(teacher=str(teacher), out=str(tmp_path / "student"), student_layers=1,
                        student_hidden_size=32, num_prompts=8, max_new_tokens=4, eval_size=2, seq_len=256, kl=kl,
                        train=TrainConfig(steps=2, batch_size=4, micro_batch_size=2, warmup_steps=1, progress=False))
    summary = distill(cfg)
    assert summary["traces"]["kept"] == 8 and 0 <= summary["pass@1_after"] <= 1
    assert summary["student_params"] < summary["teacher_params"]
    saved = json.loads((tmp_path / "student" / "distill.json").read_text())
    assert saved["pass@1_after"] == summary["pass@1_after"]
    assert len((tmp_path / "student" / "traces.jsonl").read_text().splitlines()) == 8
    rows = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and (kl is None or rows[-1]["kl"] >= 0)
    assert load_pretrained(tmp_path / "student").config.num_hidden_layers == 1


def test_a_teacher_that_solves_nothing_is_a_clear_error(teacher, tmp_path):
    args = ["distill", "--teacher", str(teacher), "--out", str(tmp_path / "s"), "--num-prompts", "2",
            "--samples-per-prompt", "2", "--max-new-tokens", "4", "--no-progress"]
    assert main(args) == 2  # random teacher: no correct trace -> one-line error, exit code 2
