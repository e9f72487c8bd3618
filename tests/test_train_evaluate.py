"""Evaluation: exact-match scoring (pass@1, pass@k, maj@k) with a scripted engine, prompt layouts,
the held-out loss against a hand computation, and `nanoseek eval` end to end on a micro checkpoint."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, Transformer, save_pretrained
from nanoseek.data import get_task, load_data
from nanoseek.data.prompts import prompt_ids
from nanoseek.inference import Completion
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import evaluate as ev


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(load_data("arithmetic", n=300), vocab_size=320)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                                             intermediate_size=128, moe_intermediate_size=32,
                                             bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    return Transformer(cfg).eval()


class ScriptedEngine:
    """Stands in for nanoseek.inference.Engine: answers each prompt with script(prompt_index, sample)."""
    script = None
    calls = []

    def __init__(self, model, tokenizer):
        self.tokenizer, self.stats = tokenizer, {}

    def generate(self, prompts, max_new_tokens, temperature=0.0, top_p=None, seed=None):
        ScriptedEngine.calls.append((len(prompts), temperature, top_p))
        texts = [ScriptedEngine.script(prompt) for prompt in prompts]
        return [Completion(self.tokenizer.encode(t), "stop") for t in texts]


def scripted(monkeypatch, tokenizer, answer_of):
    """answer_of(example, nth call for that prompt) -> completion text."""
    task = get_task("arithmetic")
    examples = task.examples("test", 6, seed=0)
    by_prompt = {tuple(prompt_ids(tokenizer, ex)): ex for ex in examples}
    seen = {}

    def script(prompt):
        ex = by_prompt[tuple(prompt)]
        seen[ex.prompt] = seen.get(ex.prompt, -1) + 1
        return answer_of(ex, seen[ex.prompt])

    ScriptedEngine.script, ScriptedEngine.calls = script, []
    monkeypatch.setattr(ev, "Engine", ScriptedEngine)
    return task, examples


def test_accuracy_counts_exact_matches(monkeypatch, tokenizer, model):
    # right on even problems, wrong on odd ones, no <answer> on the last
    def answer_of(ex, _):
        i = int(ex.meta["a"]) % 2 if ex is not None else 0
        return f"work\n</think>\n\n<answer>{ex.answer if i == 0 else 'nope'}</answer>"

    task, examples = scripted(monkeypatch, tokenizer, answer_of)
    res = ev.evaluate_accuracy(model, tokenizer, task, examples=examples, batch_size=4, progress=False)
    expected = sum(int(ex.meta["a"]) % 2 == 0 for ex in examples)
    assert res["n"] == 6 and res["correct"] == expected and res["accuracy"] == expected / 6 == res["pass@1"]
    assert [c[0] for c in ScriptedEngine.calls] == [4, 2]  # batched
    assert len(res["samples"]) == 6 and res["samples"][0]["expected"] == examples[0].answer
    assert all(s["correct"] == (s["answer"] == s["expected"]) for s in res["samples"])


def test_pass_at_k_and_majority(monkeypatch, tokenizer, model):
    # 4 samples per problem: only sample 0 right (pass@4 = 1, maj@4 = 0), or 3 of 4 right on a[0]
    def answer_of(ex, nth):
        good = nth == 0 or (ex.prompt == first and nth < 3)
        return f"<answer>{ex.answer if good else '-1'}</answer>"

    first = get_task("arithmetic").examples("test", 6, seed=0)[0].prompt
    task, examples = scripted(monkeypatch, tokenizer, answer_of)
    res = ev.evaluate_accuracy(model, tokenizer, task, examples=examples, k=4, temperature=0.6, top_p=0.95,
                               batch_size=8, progress=False)
    assert res["pass@1"] == pytest.approx((5 * 1 + 3) / 24)
    assert res["pass@4"] == 1.0 and res["maj@4"] == pytest.approx(1 / 6)
    assert {c[1:] for c in ScriptedEngine.calls} == {(0.6, 0.95)}


def test_k_samples_need_a_temperature(tokenizer, model):
    with pytest.raises(ValueError, match="need temperature > 0"):
        ev.evaluate_accuracy(model, tokenizer, "arithmetic", n=2, k=4)


def test_held_out_loss_matches_a_hand_computation(tokenizer, model):
    examples = get_task("arithmetic").examples("test", 3)
    res = ev.evaluate_loss(model, tokenizer, examples=examples, layout="text", seq_len=512)
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:  # one document at a time, no packing
            ids = tokenizer.encode(ex.text(), add_bos=True) + [tokenizer.eos_id]
            logits = model(torch.tensor([ids[:-1]]))[0]
            total += float(F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
            count += len(ids) - 1
    assert res["tokens"] == count
    assert res["loss"] == pytest.approx(total / count, rel=1e-4)
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))


def test_real_engine_and_the_command(tmp_path, tokenizer, model, capsys):
    save_pretrained(model, tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    res = ev.evaluate_accuracy(model, tokenizer, "arithmetic", n=3, max_new_tokens=6, progress=False)
    assert 0 <= res["accuracy"] <= 1 and res["n"] == 3 and all(s["tokens"] <= 6 for s in res["samples"])
    from nanoseek.cli import main
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tmp_path / "ckpt"), "--n", "3", "--max-new-tokens", "6",
                 "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["n"] == 3 and saved["layout"] == "chat" and saved["loss"] > 0
    assert "held-out loss" in capsys.readouterr().out
