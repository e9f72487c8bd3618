"""Per-request logits controls (penalties, logit_bias, min_tokens, min_p, guides) and log-probs."""

import pytest
import torch
from conftest import randomize_
from test_inference_engine import mtp_friendly

from nanoseek.config import ModelConfig
from nanoseek.inference import Batch, Engine, SamplingParams, Sequence
from nanoseek.inference.sampling import penalize, sampling_probs
from nanoseek.model import Transformer

PROMPT = [5, 6, 7, 8, 9, 5, 6]


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(eos_token_id=None)
    return Engine(mtp_friendly(randomize_(Transformer(cfg), scale=0.1)))


def run(engine, params, prompt=PROMPT, speculative=None):
    seq = Sequence(prompt, params)
    batch = Batch(engine, 2, 128, speculative)
    batch.admit([seq])
    while batch.rows:
        batch.leave()
        batch.step()
    assert seq.finish_reason in ("stop", "length"), seq.error
    return seq


@torch.no_grad()
def reference(engine, prompt, n, control):
    """Uncached loop: full forward, control(logits, out) -> argmax."""
    ids = list(prompt)
    for _ in range(n):
        logits = engine.model(torch.tensor([ids]))[0, -1].float()
        ids.append(int(control(logits, ids[len(prompt):]).argmax()))
    return ids[len(prompt):]


def test_penalize_follows_openai_and_ctrl():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    seen = torch.tensor([[True, True, True, False]])  # token 2 only in the prompt
    got = penalize(logits, counts, seen, torch.tensor([0.5]), torch.tensor([0.25]), torch.tensor([2.0]))
    assert torch.allclose(got, torch.tensor([[1.0 - 0.5 - 0.5, -4.0 - 0.25 - 0.5, 0.5, 0.5]]))


def test_min_p_keeps_tokens_at_least_that_fraction_of_the_top():
    probs = sampling_probs(torch.tensor([[0.0, -0.5, -1.0, -5.0]]), 1.0, min_p=0.3)
    p = torch.tensor([0.0, -0.5, -1.0, -5.0]).softmax(-1)
    assert probs[0, 3] == 0 and (probs[0, :3] > 0).all()
    assert torch.allclose(probs[0, :3], p[:3] / p[:3].sum())


def test_penalties_and_bias_equal_an_uncached_reference(engine):
    params = SamplingParams(10, presence_penalty=0.5, frequency_penalty=1.0, repetition_penalty=1.3,
                            logit_bias={7: 2.0, 3: -100})

    def control(logits, out):
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[-1]).float()[None]
        seen = counts > 0
        seen[0, PROMPT] = True
        logits = penalize(logits[None], counts, seen, torch.tensor([0.5]), torch.tensor([1.0]),
                          torch.tensor([1.3]))[0]
        logits[7] += 2.0
        logits[3] -= 100
        return logits

    got = run(engine, params).out
    assert got == reference(engine, PROMPT, 10, control)
    assert got != run(engine, SamplingParams(10)).out  # the controls did something
    assert 3 not in got


def test_min_tokens_masks_eos_until_reached(engine):
    first = run(engine, SamplingParams(1)).out[0]
    model = Engine(engine.model)
    model.config = engine.config.replace(eos_token_id=first)  # the greedy first token is EOS
    assert run(model, SamplingParams(8)).out == []
    seq = run(model, SamplingParams(8, min_tokens=3))
    assert len(seq.out) >= 3 and first not in seq.out[:3]


def test_logprobs_are_the_models_log_softmax_and_speculation_keeps_them(engine):
    params = SamplingParams(6, logprobs=3, prompt_logprobs=2)
    seq = run(engine, params)
    with torch.no_grad():
        full = engine.model(torch.tensor([PROMPT + seq.out]))[0].float().log_softmax(-1)
    for j, (t, lp, top) in enumerate(seq.logprobs):
        row = full[len(PROMPT) - 1 + j]
        assert t == seq.out[j] and abs(lp - row[t].item()) < 1e-4
        assert [i for i, _ in top] == row.topk(3).indices.tolist()
    assert seq.prompt_logprobs[0] is None and len(seq.prompt_logprobs) == len(PROMPT)
    for j, (t, lp, top) in enumerate(seq.prompt_logprobs[1:], 1):
        assert t == PROMPT[j] and abs(lp - full[j - 1, t].item()) < 1e-4 and len(top) == 2
    mtp = run(engine, params, speculative="mtp")
    assert mtp.out == seq.out and [x[0] for x in mtp.logprobs] == seq.out


def test_default_settings_leave_greedy_untouched(engine):
    assert run(engine, SamplingParams(8)).out == reference(engine, PROMPT, 8, lambda logits, out: logits)


class OnlyEven:
    """A guide that allows even token ids only."""
    def __init__(self):
        self.seen = []

    def allowed(self, V):
        return torch.arange(V) % 2 == 0

    def accept(self, t):
        self.seen.append(t)


def test_a_guide_masks_every_token_and_sees_each_one(engine):
    guides = []
    seq = run(engine, SamplingParams(8, temperature=1.0, seed=0, guide=lambda: guides.append(OnlyEven()) or guides[-1]))
    assert seq.out and all(t % 2 == 0 for t in seq.out) and guides[0].seen == seq.out


@pytest.mark.parametrize("bad, message", [
    (dict(min_p=1.5), "min_p"), (dict(presence_penalty=3), "presence_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(logit_bias={1: 200}), "logit_bias"),
    (dict(logprobs=21), "logprobs"), (dict(min_tokens=-1), "min_tokens"),
])
def test_bad_controls_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(4, **bad).validate()
