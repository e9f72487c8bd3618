"""Your own data and LoRA: a JSONL and a Parquet dataset with custom column names drive GRPO (a
user reward in a module file receives the columns), eval, SFT (prompt/completion records) and
distillation; a `datasets` save_to_disk folder loads by split; LoRA trains only adapter weights
and its merged checkpoint loads into transformers with the adapted model's logits."""

import json
import sys
import textwrap
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import arithmetic_checkpoint, randomize_

from nanoseek.cli import main
from nanoseek.config import ModelConfig
from nanoseek.data.records import load_examples, reward_columns, train_and_held_out
from nanoseek.hf import load_pretrained, save_pretrained
from nanoseek.model import Transformer
from nanoseek.rl.lora import add_lora, merge_and_unload, merged

ROWS = [{"question": f"What is {a} + {b}?", "solution": str(a + b), "level": a % 3} for a, b in
        [(12, 30), (7, 8), (40, 2), (9, 9), (21, 21), (5, 6), (33, 3), (14, 1)]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    return arithmetic_checkpoint(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS[:4]), d / "test.parquet")
    return d


def test_records_carry_prompt_answer_and_columns(files):
    ex = load_examples(str(files / "train.jsonl"), prompt_column="question", answer_column="solution")
    assert ex[0].prompt == "What is 12 + 30?" and ex[0].answer == "42"
    cols = reward_columns(ex[:2])
    assert cols["level"] == [0, 1] and cols["answer"] == ["42", "15"] and cols["solution"] == ["42", "15"]
    pq_ex = load_examples(str(files / "test.parquet"), prompt_column="question", answer_column="solution")
    assert [e.answer for e in pq_ex] == ["42", "15", "42", "18"]
    train, held = train_and_held_out(str(files / "train.jsonl"), "train", None, "test", 3, "question", "solution")
    assert len(train) == 5 and len(held) == 3 and not {e.prompt for e in train} & {e.prompt for e in held}
    with pytest.raises(ValueError, match="no prompt column 'prompt'"):
        load_examples(str(files / "train.jsonl"))


def test_datasets_folder_by_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:6]),
                               "test": datasets.Dataset.from_list(ROWS[6:])})
    dd.save_to_disk(str(tmp_path / "hf"))
    train, held = train_and_held_out(str(tmp_path / "hf"), "train", None, "test", 2, "question", "solution")
    assert len(train) == 6 and [e.answer for e in held] == ["36", "15"]
    with pytest.raises(ValueError, match="splits"):
        load_examples(str(tmp_path / "hf"), "validation", "question", "solution")


def test_grpo_eval_sft_distill_on_custom_columns(ckpt, files, tmp_path, monkeypatch):
    (tmp_path / "ds_rewards.py").write_text(textwrap.dedent("""
        CALLS = []
        def by_level(prompts, completions, level, solution, **kw):
            CALLS.append((list(level), list(solution)))
            return [float(len(c) % 3) + lv for c, lv in zip(completions, level)]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    data, held = str(files / "train.jsonl"), str(files / "test.parquet")
    cols = ["--prompt-column", "question", "--answer-column", "solution"]
    assert main(["grpo", "--model", str(ckpt), "--out", str(tmp_path / "grpo"), "--dataset", data, *cols,
                 "--eval-dataset", held, "--steps", "1", "--prompts-per-step", "2", "--group-size", "2",
                 "--max-new-tokens", "4", "--eval-size", "2", "--reward", "math", "ds_rewards:by_level",
                 "--no-progress"]) == 0
    import ds_rewards
    level, solution = ds_rewards.CALLS[0]
    assert len(level) == 4 and set(solution) <= {r["solution"] for r in ROWS}
    row = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()][-1]
    assert "reward/ds_rewards:by_level" in row and "eval/pass@1" in row and "eval/stderr" in row
    sys.modules.pop("ds_rewards", None)

    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(ckpt), "--dataset", held, *cols, "--samples", "2", "--temperature", "0.6",
                 "--top-p", "0.95", "--max-new-tokens", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 4 and res["k"] == 2 and {"pass@1", "stderr", "cons@2"} <= set(res)

    sft_data = tmp_path / "pc.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": r["question"], "completion": f"<think>add</think><answer>"
                                          f"{r['solution']}</answer>"} for r in ROWS]), sft_data)
    assert main(["sft", "--model", str(ckpt), "--out", str(tmp_path / "sft"), "--dataset", str(sft_data),
                 "--steps", "1", "--batch-size", "2", "--micro-batch-size", "2", "--seq-len", "64",
                 "--no-progress"]) == 0

    from nanoseek.rl import distill as distill_module
    captured = {}

    def fake_rejection_sample(engine, tokenizer, examples, *a, **kw):
        captured["prompts"] = [e.prompt for e in examples]
        return [[{"role": "user", "content": e.prompt}, {"role": "assistant", "content": f"<answer>{e.answer}</answer>",
                 "reasoning_content": "add"}] for e in examples], {"prompts": len(examples), "samples": 0,
                                                                   "correct": 0, "kept": len(examples),
                                                                   "prompts_covered": len(examples)}
    monkeypatch.setattr(distill_module, "rejection_sample", fake_rejection_sample)
    assert main(["distill", "--teacher", str(ckpt), "--out", str(tmp_path / "distill"), "--dataset", data, *cols,
                 "--eval-dataset", held, "--student-layers", "1", "--steps", "1", "--batch-size", "2",
                 "--micro-batch-size", "2", "--seq-len", "64", "--eval-size", "2", "--max-new-tokens", "4",
                 "--no-progress"]) == 0
    assert captured["prompts"] == [r["question"] for r in ROWS]


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2"])
def test_lora_trains_only_adapters_and_merges_to_a_plain_checkpoint(tmp_path, preset):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig.preset(preset).replace(vocab_size=96, hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=2, max_position_embeddings=128)
    model = randomize_(Transformer(cfg))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model = add_lora(model, rank=4, alpha=8)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert any("self_attn" in n for n in trained)
    if preset == "tiny":
        assert any("shared_experts" in n for n in trained)
    else:  # grouped-query attention: every projection, k and v included
        assert {p for p in ("q_proj", "k_proj", "v_proj", "o_proj") if any(f"self_attn.{p}." in n for n in trained)} \
            == {"q_proj", "k_proj", "v_proj", "o_proj"}
    x = torch.randint(0, 96, (2, 12))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        adapted = model(x)
        with merged(model):
            assert torch.allclose(model(x), adapted, atol=1e-5)
    for name, value in model.state_dict().items():  # the base weights never moved (merge+unmerge rounds)
        base = name.replace(".base_layer", "")
        if "lora_" not in name and base in before:
            assert torch.allclose(value, before[base], atol=1e-6), name
    plain = merge_and_unload(model).eval()
    assert set(plain.state_dict()) == set(before)
    save_pretrained(plain, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, adapted, atol=1e-4)
    assert torch.allclose(load_pretrained(tmp_path, dtype=torch.float32)(x), adapted, atol=1e-5)
