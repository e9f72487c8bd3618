"""GRPO: the engine samples from the trainer's updated weights after every optimizer step, the
engine/trainer log-prob check, a sandboxed reward that never returns does not stop training, and
the `nanoseek grpo` command end to end (metrics, samples, plot, checkpoint, resume)."""

import copy
import dataclasses
import json
import textwrap

import pytest
import torch
from conftest import arithmetic_checkpoint, tokens

from nanoseek.hf import load_pretrained
from nanoseek.cli import main
from nanoseek.data.tasks import get_task
from nanoseek.inference import Engine
from nanoseek.rl.grpo import (Algorithm, GRPOConfig, engine_logprobs, grpo_step, policy_logprobs, policy_update,
                              sample_groups, sequence_batch)
from nanoseek.rl.rollouts import length_batches
from nanoseek.rl.sandbox import run_python
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.optim import build_adamw


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random model (2 layers, MoE, MTP) with a tokenizer trained on arithmetic."""
    path = tmp_path_factory.mktemp("base")
    return arithmetic_checkpoint(path)


def _setup(ckpt, tmp_path, **kw):
    model, tok = load_pretrained(ckpt, dtype=torch.float32), Tokenizer.from_pretrained(ckpt)
    settings = {**dict(model=str(ckpt), out=str(tmp_path / "run"), beta=0.0, lr=3e-2, group_size=4,
                       max_new_tokens=6, micro_batch_size=4, logprob_check_every=1), **kw}
    return model, tok, GRPOConfig(**settings)


def _varied(prompts, completions, **columns):
    """A reward that differs within a group, so advantages (and the update) are nonzero."""
    return [float(len(c) % 5) for c in completions]


def test_engine_samples_from_updated_weights_after_each_step(ckpt, tmp_path):
    model, tok, cfg = _setup(ckpt, tmp_path)
    engine = Engine(model, tok)
    optimizer = build_adamw(model, cfg.lr, 0.0)
    examples = get_task("arithmetic").examples("train", 2, seed=1)
    probe = sample_groups(engine, tok, examples, 2, 6, temperature=1.0, top_p=None, seed=123)
    prompts = [probe.prompts[i // 2] for i in range(len(probe.completions))]
    for step in range(2):
        before = copy.deepcopy(model)
        row, _ = grpo_step(model, None, engine, optimizer, tok, examples, [("varied", _varied, 1.0)], cfg, step)
        assert row["grad_norm"] > 0
        # the rollout of this step came from the weights the trainer scored it with
        assert row["logprob_mismatch_max"] < 1e-4
        live = engine_logprobs(engine, prompts, probe.completions, 1.0)
        fresh = engine_logprobs(Engine(copy.deepcopy(model)), prompts, probe.completions, 1.0)
        stale = engine_logprobs(Engine(before), prompts, probe.completions, 1.0)
        assert all(torch.equal(a, b) for a, b in zip(live, fresh))
        assert max(float((a - b).abs().max()) for a, b in zip(live, stale)) > 1e-3
        # and sampling with a seed gives exactly what a fresh engine on the updated weights gives
        a = tokens(engine.generate(probe.prompts, 6, temperature=1.0, seed=7))
        b = tokens(Engine(copy.deepcopy(model), tok).generate(probe.prompts, 6, temperature=1.0, seed=7))
        assert a == b


def test_sequence_batch_masks_exactly_the_completion():
    ids, targets, mask = sequence_batch([[5, 6, 7], [8]], [[1, 2], [3], [4, 4, 4], [9]], group_size=2, pad_id=0)
    assert ids.tolist()[0] == [5, 6, 7, 1] and targets.tolist()[0] == [6, 7, 1, 2]
    assert mask.tolist() == [[0, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0]]

    # rows longest first in micro-batches, each cut after its longest row's last completion token
    assert [(rows.tolist(), n) for rows, n in length_batches(mask, 2)] == [([0, 1], 4), ([2, 3], 3)]
    assert [(rows.tolist(), n) for rows, n in length_batches(mask, 3, keep_order=True)] == [([0, 1, 2], 4), ([3], 1)]


def test_length_batches_leave_logprobs_and_the_update_unchanged(ckpt, tmp_path):
    """Sorting rows by length and cutting each micro-batch's padding is only a saving: the log-probs on
    completion tokens and the update equal one micro-batch over the whole padded batch."""
    model, tok, cfg = _setup(ckpt, tmp_path, max_new_tokens=12, beta=0.04, mu=2)
    examples = get_task("arithmetic").examples("train", 3, seed=8)
    rollout = sample_groups(Engine(model, tok), tok, examples, cfg.group_size, cfg.max_new_tokens, 1.0, None, seed=9)
    completions = [c[:2 + i % 9] for i, c in enumerate(rollout.completions)]  # lengths 2..10
    batch = sequence_batch(rollout.prompts, completions, cfg.group_size, tok.pad_id)
    mask = batch[2]
    assert len({n for _, n in length_batches(mask, 3)}) > 2
    whole = policy_logprobs(model, *batch, 1.0, len(mask))
    cut = policy_logprobs(model, *batch, 1.0, 3)
    assert torch.allclose(whole[mask], cut[mask], atol=1e-5)
    advantages = torch.linspace(-1.0, 1.0, len(mask))
    algo = Algorithm.from_config(cfg)
    updated = []
    for micro in (len(mask), 3):
        m = copy.deepcopy(model)
        step_cfg = dataclasses.replace(cfg, micro_batch_size=micro)
        # plain SGD: AdamW's first step turns a gradient's rounding noise into a full-size step
        policy_update(m, torch.optim.SGD(m.parameters(), lr=cfg.lr), batch, advantages, whole, whole, step_cfg,
                      cfg.lr, algo)
        updated.append([q.detach() for q in m.parameters()])
    assert max(float((a - b).abs().max()) for a, b in zip(*updated)) < 1e-6
    assert max(float((a - b).abs().max()) for a, b in zip(updated[0], model.parameters())) > 1e-4  # it trained


def _forever(prompts, completions, **columns):
    """A reward whose code never ends: the sandbox kills it and it scores 0."""
    return [float(run_python("while True:\n    pass", timeout_s=0.3).ok) for _ in completions]


def test_a_reward_that_runs_forever_does_not_stop_training(ckpt, tmp_path):
    model, tok, cfg = _setup(ckpt, tmp_path)
    engine = Engine(model, tok)
    optimizer = build_adamw(model, cfg.lr, 0.0)
    examples = get_task("arithmetic").examples("train", 1, seed=2)
    rewards = [("forever", _forever, 1.0), ("varied", _varied, 1.0)]
    row, rollout = grpo_step(model, None, engine, optimizer, tok, examples, rewards, cfg, 0)
    assert row["reward/forever"] == 0.0 and len(rollout.texts) == 4 and row["step"] == 1


def test_kl_to_reference_is_zero_at_the_start(ckpt, tmp_path):
    model, tok, cfg = _setup(ckpt, tmp_path, beta=0.04, lr=1e-3)
    reference = copy.deepcopy(model).requires_grad_(False)
    optimizer = build_adamw(model, cfg.lr, 0.0)
    examples = get_task("arithmetic").examples("train", 1, seed=3)
    row, _ = grpo_step(model, reference, Engine(model, tok), optimizer, tok, examples,
                       [("varied", _varied, 1.0)], cfg, 0)
    assert row["kl"] == 0.0  # the policy scored before its first update equals the reference
    row, _ = grpo_step(model, reference, Engine(model, tok), optimizer, tok, examples,
                       [("varied", _varied, 1.0)], cfg, 1)
    assert row["kl"] > 0.0


def test_the_logprob_check_and_mu_one_leave_the_update_unchanged(ckpt, tmp_path):
    """The engine-vs-trainer check is an optional extra forward: with or without it, two steps give the
    same weights. With mu = 1 the old policy is the current one, so skipping its forward (old_logp None)
    gives the update that passing its log-probabilities explicitly gives."""
    examples = get_task("arithmetic").examples("train", 2, seed=4)
    after = {}
    for every in (1, 0):
        model, tok, cfg = _setup(ckpt, tmp_path, logprob_check_every=every, beta=0.04)
        reference = copy.deepcopy(model).requires_grad_(False)
        optimizer = build_adamw(model, cfg.lr, 0.0)
        for step in range(2):
            row, _ = grpo_step(model, reference, Engine(model, tok), optimizer, tok, examples,
                               [("varied", _varied, 1.0)], cfg, step)
            assert ("logprob_mismatch_max" in row) == bool(every) and row["grad_norm"] > 0
        after[every] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after[1], after[0]))

    model, tok, cfg = _setup(ckpt, tmp_path, logprob_check_every=0)
    rollout = sample_groups(Engine(model, tok), tok, examples, cfg.group_size, cfg.max_new_tokens, 1.0, None, seed=5)
    batch = sequence_batch(rollout.prompts, rollout.completions, cfg.group_size, tok.pad_id)
    advantages = torch.linspace(-1.0, 1.0, len(rollout.completions))
    algo = Algorithm.from_config(cfg)
    updated = []
    for old in (None, policy_logprobs(model, *batch, 1.0, cfg.micro_batch_size)):
        m = copy.deepcopy(model)
        stats = policy_update(m, build_adamw(m, cfg.lr, 0.0), batch, advantages, old, None, cfg, cfg.lr, algo)
        assert stats["grad_norm"] > 0
        updated.append(list(m.parameters()))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*updated))


def test_mu_one_runs_no_old_policy_forward(ckpt, tmp_path, monkeypatch):
    """Trainer-side log-prob forwards outside the update: none with mu = 1, beta = 0 and no check;
    one more for each of the check, the reference (beta > 0) and mu > 1."""
    import nanoseek.rl.grpo as grpo_module
    calls = []
    real = grpo_module.policy_logprobs
    monkeypatch.setattr(grpo_module, "policy_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    examples = get_task("arithmetic").examples("train", 1, seed=6)
    for kw, want in ((dict(logprob_check_every=0), 0), (dict(logprob_check_every=1), 1),
                     (dict(logprob_check_every=0, mu=2), 1), (dict(logprob_check_every=0, beta=0.04), 1)):
        model, tok, cfg = _setup(ckpt, tmp_path, **kw)
        reference = copy.deepcopy(model).requires_grad_(False) if cfg.beta else None
        calls.clear()
        grpo_step(model, reference, Engine(model, tok), build_adamw(model, cfg.lr, 0.0), tok, examples,
                  [("varied", _varied, 1.0)], cfg, 0)
        assert len(calls) == want, kw


def test_grpo_command_end_to_end_and_resume(ckpt, tmp_path, monkeypatch):
    (tmp_path / "grpo_test_rewards.py").write_text(textwrap.dedent("""
        def varied(prompts, completions, **columns):
            return [float(len(c) % 5) for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    args = ["grpo", "--model", str(ckpt), "--out", str(out), "--dataset", "arithmetic", "--steps", "2",
            "--prompts-per-step", "1", "--group-size", "3", "--max-new-tokens", "4", "--eval-size", "1",
            "--eval-every", "1", "--sample-every", "1", "--reward", "accuracy", "grpo_test_rewards:varied=0.5",
            "--logprob-check-every", "1", "--no-progress"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("reward_mean", "reward_std", "accuracy", "response_length", "kl", "clip_fraction", "entropy",
                "no_signal_groups", "truncation_rate", "unparseable_rate", "logprob_mismatch_mean",
                "rollout_tokens_per_s", "eval/pass@1", "reward/grpo_test_rewards:varied"):
        assert key in rows[-1], key
    assert (out / "grpo.png").stat().st_size > 0 and (out / "samples.jsonl").exists()
    load_pretrained(out)
    assert main(args[:8] + ["3"] + args[9:] + ["--resume"]) == 0  # --steps 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3
    with pytest.raises(ValueError, match="already holds"):
        from nanoseek.rl.grpo import grpo
        grpo(GRPOConfig(model=str(ckpt), out=str(out), steps=1))


@pytest.mark.parametrize("field, value, match", [
    ("loss_type", "ppo", "loss_type"), ("scale_rewards", "max", "scale_rewards"),
    ("importance_sampling", "word", "importance_sampling"), ("dataset", "chess", "neither a built-in task"),
    ("dataset", "arithmetic:digits", "key=value"), ("dataset", "arithmetic:colour=red", "colour"), ("group_size", 1, "group_size"),
    ("temperature", 0.0, "temperature"), ("reward", ["no_such_mod:fn"], "cannot import"),
])
def test_config_errors_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(model="m", out="o", **{field: value})


def test_prompt_layouts_leave_think_open(ckpt, tmp_path):
    """R1 (chat template) and R1-Zero (pretraining's text layout) prompts both end inside <think>."""
    model, tok, _ = _setup(ckpt, tmp_path)
    examples = get_task("arithmetic").examples("train", 1, seed=4)
    for layout, start in (("chat", "<｜begin▁of▁sentence｜><｜User｜>"), ("text", "<｜begin▁of▁sentence｜>What")):
        rollout = sample_groups(Engine(model, tok), tok, examples, 2, 3, 1.0, None, seed=0, layout=layout)
        assert rollout.prompt_texts[0].startswith(start) and rollout.prompt_texts[0].endswith("<think>\n")
    assert GRPOConfig(model=str(ckpt), out="o").layout == "chat"  # no training state: a chat checkpoint


def _index(prompts, completions, **columns):
    """A reward that differs within every group (the completion's place in it): every group has signal."""
    return [float(g) for g in range(len(completions))]


def test_dynamic_sampling_changes_nothing_when_every_group_has_signal(ckpt, tmp_path):
    """Off, a step never draws extra prompts and logs no dynamic/ counts; on, with signal in every
    group of the first round, it draws none either and the update is the very same."""
    examples = get_task("arithmetic").examples("train", 2, seed=7)
    after = {}
    for dynamic in (False, True):
        model, tok, cfg = _setup(ckpt, tmp_path, dynamic_sampling=dynamic, logprob_check_every=0)
        drawn = []
        row, rollout = grpo_step(model, None, Engine(model, tok), build_adamw(model, cfg.lr, 0.0), tok, examples,
                                 [("index", _index, 1.0)], cfg, 0, more_examples=lambda r: drawn.append(r) or [])
        assert drawn == [] and row["grad_norm"] > 0 and rollout.examples == examples
        assert ("dynamic/groups_kept" in row) == dynamic and row.get("dynamic/groups_dropped", 0) == 0
        after[dynamic] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after[False], after[True]))


def test_dynamic_sampling_trains_on_groups_with_signal_from_further_rounds(ckpt, tmp_path):
    first = get_task("arithmetic").examples("train", 2, seed=8)
    fresh = get_task("arithmetic").examples("train", 4, seed=9)
    flat = {ex.prompt for ex in first} | {fresh[0].prompt}

    def reward(prompts, completions, **columns):  # no signal for the first round's prompts and fresh[0]
        return [1.0 if any(p in q for p in flat) else float(i % 3) for i, q in enumerate(prompts)]

    model, tok, cfg = _setup(ckpt, tmp_path, dynamic_sampling=True, max_resample_rounds=3, logprob_check_every=0)
    rounds = {1: fresh[:2], 2: fresh[2:]}
    drawn = []
    row, rollout = grpo_step(model, None, Engine(model, tok), build_adamw(model, cfg.lr, 0.0), tok, first,
                             [("r", reward, 1.0)], cfg, 0, more_examples=lambda r: drawn.append(r) or rounds[r])
    assert drawn == [1, 2] and rollout.examples == [fresh[1], fresh[2]]
    assert len(rollout.completions) == 2 * cfg.group_size and row["no_signal_groups"] == 0.0
    assert (row["dynamic/groups_sampled"], row["dynamic/groups_dropped"], row["dynamic/groups_kept"]) == (6, 3, 2)
    assert row["grad_norm"] > 0


def test_dynamic_sampling_is_refused_under_several_processes_and_without_more_prompts(ckpt, tmp_path):
    from nanoseek.rl.grpo import grpo
    from nanoseek.train.distributed import DistEnv
    cfg = GRPOConfig(model=str(ckpt), out=str(tmp_path / "run"), dynamic_sampling=True, prompts_per_step=2)
    with pytest.raises(ValueError, match="one process only"):
        grpo(cfg, env=DistEnv(rank=0, world_size=2))
    model, tok, cfg = _setup(ckpt, tmp_path, dynamic_sampling=True)
    with pytest.raises(ValueError, match="more_examples"):  # grpo_step without a source of further prompts
        grpo_step(model, None, Engine(model, tok), build_adamw(model, cfg.lr, 0.0), tok,
                  get_task("arithmetic").examples("train", 1, seed=1), [("index", _index, 1.0)], cfg, 0)
