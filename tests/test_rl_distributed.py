"""GRPO under torchrun: 2 CPU processes (gloo) each roll out half of every step's prompts; with
--seed-per-prompt the samples do not depend on the split, so rewards, advantages and the summed
gradients give the same update as one process (same checkpoint within float tolerance)."""

import json
import os
import subprocess
import sys

import torch

from nanoseek.config import ModelConfig
from nanoseek.data.tasks import get_task
from nanoseek.hf import load_pretrained, save_pretrained
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer


def test_two_process_grpo_equals_one(tmp_path):
    base = tmp_path / "base"
    tok = Tokenizer.train([ex.text() for ex in get_task("arithmetic").examples("train", 200)], vocab_size=320)
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2)
    save_pretrained(Transformer(cfg), base)
    (tmp_path / "dist_rewards.py").write_text(
        "def varied(prompts, completions, **kw):\n    return [float(len(c) % 5) for c in completions]\n")
    tok.save_pretrained(base)
    args = ["grpo", "--model", str(base), "--dataset", "arithmetic", "--steps", "2", "--prompts-per-step", "2",
            "--group-size", "3", "--max-new-tokens", "5", "--micro-batch-size", "3", "--eval-size", "1",
            "--eval-every", "0", "--sample-every", "0", "--seed-per-prompt", "--lr", "1e-2", "--beta", "0.04",
            "--scale-rewards", "batch", "--loss-type", "dapo", "--reward", "dist_rewards:varied", "format=0.1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([os.getcwd(), str(tmp_path)])}
    env.pop("WORLD_SIZE", None)
    one = subprocess.run([sys.executable, "-m", "nanoseek", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "nanoseek", *args, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "over 2 process(es)" in two.stdout
    rows = [[json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "two")]
    assert all(r["grad_norm"] > 0 for r in rows[0][1:])  # a real update, not a no-signal step
    for a, b in zip(rows[0][1:], rows[1][1:]):
        for key in ("reward_mean", "reward_std", "response_length", "loss", "kl", "grad_norm"):
            assert abs(a[key] - b[key]) < 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])
    m1, m2 = load_pretrained(tmp_path / "one"), load_pretrained(tmp_path / "two")
    for (name, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.allclose(p1, p2, atol=1e-5), name
