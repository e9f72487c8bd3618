"""GRPO under torchrun: 2 CPU processes (gloo) each roll out half of every step's prompts on a full
copy of the FSDP2-sharded policy (with expert parallelism too); with --seed-per-prompt the samples do
not depend on the split, so rewards, advantages and the reduced gradients give the same update as one
process (same checkpoint within float tolerance)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import arithmetic_checkpoint

from nanoseek.config import ModelConfig
from nanoseek.data.tasks import get_task
from nanoseek.hf import load_pretrained, save_pretrained
from nanoseek.model import Transformer
from nanoseek.rl import distill as distill_module
from nanoseek.rl.distill import DistillConfig
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.distributed import DistEnv
from nanoseek.train.loop import TrainConfig


# (flags of the 2-process run only, flags of both runs, weight tolerance): FSDP2, stopped after step 1
# and resumed from its sharded checkpoint (AdamW holds no state for the MTP module RL leaves alone); FSDP2 + EP with
# mu = 2 (an old-policy forward through the sharded model) and activation checkpointing. Experts'
# gradients are summed in another order there (all-to-all, then index_add) and AdamW's division by
# sqrt(v) amplifies that rounding in the weights (the losses and gradient norms agree within 1e-4).
# LoRA under FSDP2: adapters trained sharded, merged into the rollout copy's whole weights at the end.
LAYOUTS = {"fsdp": ([], [], 1e-5), "fsdp_ep2": (["--ep", "2", "--gradient-checkpointing"], ["--mu", "2"], 1e-4),
           "fsdp_lora": ([], ["--lora-rank", "4"], 1e-5)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_process_grpo_equals_one(tmp_path, layout):
    two_only, both, atol = LAYOUTS[layout]
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
            "--scale-rewards", "batch", "--loss-type", "dapo", "--reward", "dist_rewards:varied", "format=0.1", "--no-progress",
            *both]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([os.getcwd(), str(tmp_path)])}
    env.pop("WORLD_SIZE", None)
    one = subprocess.run([sys.executable, "-m", "nanoseek", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    def torchrun(*extra):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "nanoseek", *args, *two_only, "--out", str(tmp_path / "two"), *extra], env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        return run
    if layout == "fsdp":
        torchrun("--steps", "1")
        two = torchrun("--resume")
        assert "steps 1->2" in two.stdout
    else:
        two = torchrun()
    assert "over 2 process(es)" in two.stdout
    sharded = json.loads((tmp_path / "two" / "train_state" / "state.json").read_text()).get("sharded", False)
    assert sharded == (layout != "fsdp_lora")  # FSDP2's DCP checkpoint; a LoRA run saves its merged model
    rows = [[json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "two")]
    assert all(r["grad_norm"] > 0 for r in rows[0][1:])  # a real update, not a no-signal step
    for a, b in zip(rows[0][1:], rows[1][1:]):
        for key in ("reward_mean", "reward_std", "reward/dist_rewards:varied", "unparseable_rate", "response_length",
                    "loss", "kl", "grad_norm"):
            assert abs(a[key] - b[key]) < 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])
    m1, m2 = load_pretrained(tmp_path / "one"), load_pretrained(tmp_path / "two")
    for (name, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.allclose(p1, p2, atol=atol), name


# ----------------------------------------------------------------------------- distillation

def _accept_any(text, finish_reason, example, prompt_text):
    """A random teacher solves nothing: every non-empty trace stands in for a correct one."""
    return bool(text.strip())


def distill_config(teacher, out, **kw):
    train = TrainConfig(steps=2, batch_size=4, micro_batch_size=2, warmup_steps=1, lr=1e-2, progress=False,
                        **kw.pop("train", {}))
    return DistillConfig(teacher=str(teacher), out=str(out), student_layers=2, student_hidden_size=32,
                         num_prompts=5, samples_per_prompt=2, traces_per_prompt=2, max_new_tokens=6,
                         batch_size_generate=4, eval_size=1, seq_len=64, train=train, **kw)


def _distill_worker(rank: int, world: int, port: int, jobs: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    distill_module.is_accepted = _accept_any
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for teacher, out, kw in jobs:
            distill_module.distill(distill_config(teacher, out, **kw), DistEnv(rank, world))
        dist.barrier()  # both ranks done with every collective before either tears the group down
    finally:
        dist.destroy_process_group()


# Distillation's two student losses under 2 processes: traces (the training loop, FSDP2) and the
# teacher's logits (its own loop, FSDP2 + EP); 5 prompts split 3 + 2.
DISTILL_JOBS = {"traces": {}, "logits_ep2": {"kl": "forward", "train": {"ep": 2}}}


def test_two_process_distill_equals_one(tmp_path, monkeypatch, one_thread):
    teacher = arithmetic_checkpoint(tmp_path / "teacher")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_distill_worker, args=(2, port, [(teacher, tmp_path / f"two_{name}", kw)
                                              for name, kw in DISTILL_JOBS.items()]), nprocs=2, join=True)
    monkeypatch.setattr(distill_module, "is_accepted", _accept_any)
    for name, kw in DISTILL_JOBS.items():
        one, two = tmp_path / f"one_{name}", tmp_path / f"two_{name}"
        one_kw = {**kw, "train": {k: v for k, v in kw.get("train", {}).items() if k != "ep"}}
        distill_module.distill(distill_config(teacher, one, **one_kw))
        traces = (one / "traces.jsonl").read_text()
        assert len(traces.splitlines()) >= 5 and (two / "traces.jsonl").read_text() == traces
        assert json.loads((two / "distill.json").read_text())["processes"] == 2
        assert json.loads((two / "train_state" / "state.json").read_text())["sharded"]
        rows = [[json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
        assert [r["step"] for r in rows[1]] == [1, 2]
        for a, b in zip(*rows):
            for key in ("loss", "grad_norm", "kl"):
                if key in a:
                    assert abs(a[key] - b[key]) < 1e-5 * max(1.0, abs(a[key])), (name, key, a[key], b[key])
        m1, m2 = load_pretrained(one), load_pretrained(two)
        for (key, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
            assert torch.allclose(p1, p2, atol=1e-4), (name, key)
