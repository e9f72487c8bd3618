"""One request in the inference core: its settings (`SamplingParams`) and its row state (`Sequence`).

    params = SamplingParams(max_tokens=64, temperature=0.6, top_p=0.95, stop=["\\n\\n"])
    seq = Sequence(prompt_ids, params, tokenizer, generator=new_generator(seed=0, device="cpu"))
    seq.add([token], eos={1}); new_ids, new_text = seq.take()

A ``Batch`` (batch.py) advances sequences; a sequence accounts what it is given: EOS, token and
text stop sequences (a tail that may begin one is held back from ``take``), max_tokens, and its
finish reason.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from ..chat import TextStream, first_stop, held_suffix
from .sampling import validate_sampling


@dataclass
class SamplingParams:
    """One request's generation settings; every caller (generate, chat, serve, GRPO) fills these."""
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # text stop sequences (need a tokenizer)
    stop_token_ids: list[list[int]] = field(default_factory=list)  # stop sequences of token ids
    ignore_eos: bool = False  # run to max_tokens (benchmarks)
    # per-request logits controls (logits.py); the defaults leave the model's logits untouched
    min_p: float | None = None
    presence_penalty: float = 0.0  # OpenAI's, on generated tokens: - presence x (count > 0)
    frequency_penalty: float = 0.0  # - frequency x count
    repetition_penalty: float = 1.0  # CTRL's, on prompt and generated tokens (> 1: less likely)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_tokens: int = 0  # EOS is masked until this many tokens were generated
    logprobs: int | None = None  # record each new token's log-prob and this many alternatives
    prompt_logprobs: int | None = None  # the same for the prompt (skips the prefix cache)
    guide: object = field(default=None, compare=False)  # () -> a token guide (constrain.py) per sequence

    def validate(self) -> None:
        """Raise ValueError naming the first setting no sampler can honour."""
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r}: must be a positive integer")
        validate_sampling(self.temperature, self.top_k, self.top_p, self.min_p)
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be in [-2, 2]")
        if not 0 < self.repetition_penalty <= 10:
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r}: must be in (0, 10]")
        if not all(isinstance(t, int) and -100 <= v <= 100 for t, v in self.logit_bias.items()):
            raise ValueError("logit_bias: token ids map to biases in [-100, 100]")
        for name in ("min_tokens", "logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0 or (name != "min_tokens" and v > 20)):
                raise ValueError(f"{name}={v!r}: must be an integer >= 0{'' if name == 'min_tokens' else ' and <= 20'}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop={self.stop!r}: stop sequences must be non-empty strings")
        for s in self.stop_token_ids:
            if not isinstance(s, (list, tuple)) or not s or not all(isinstance(t, int) for t in s):
                raise ValueError(f"stop={self.stop_token_ids!r}: each stop sequence must be a non-empty "
                                 "list of token ids")


def check_prompt(prompt, max_tokens: int, context: int, vocab_size: int, what: str = "the prompt") -> None:
    """Raise ValueError unless `prompt` is token ids of the vocabulary that leave room for max_tokens."""
    if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
        raise ValueError(f"{what} is empty: expected a non-empty list of token ids")
    if not all(isinstance(t, int) and 0 <= t < vocab_size for t in prompt):
        raise ValueError(f"{what} has a token id outside 0..{vocab_size - 1}")
    if len(prompt) + max_tokens > context:
        raise ValueError(f"{what}: {len(prompt)} prompt tokens + max_tokens={max_tokens} exceed the "
                         f"context of {context} tokens")


def new_generator(seed: int | None, device) -> torch.Generator:
    """A generator of its own: seeded, or from fresh entropy (never reseeding torch's global RNG)."""
    g = torch.Generator(device=device)
    if seed is not None:
        g.manual_seed(seed)
    else:
        g.seed()
    return g


@dataclass
class Completion:
    """What ``Engine.generate`` returns per prompt."""
    tokens: list[int]  # new token ids (EOS and a token stop sequence excluded)
    finish_reason: str  # "stop" (EOS or a stop sequence) | "length" (max_tokens)
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache


class Sequence:
    """One request's row state, advanced by a ``Batch``; ``cancel()`` is thread-safe."""

    def __init__(self, prompt: list[int], params: SamplingParams, tokenizer=None,
                 generator: torch.Generator | None = None):
        self.prompt, self.params, self.generator = list(prompt), params, generator
        self.stream = TextStream(tokenizer) if tokenizer is not None else None
        self.out: list[int] = []  # generated ids (EOS and a token stop sequence excluded)
        self.text = ""  # decoded text so far, cut at a text stop sequence ("" without a tokenizer)
        self.emitted_ids = self.emitted_text = 0  # how much of out / text take() has given out
        self.length = 0  # tokens of this sequence in its cache slot
        self.last = -1  # newest token, made but not yet fed to the model
        self.draft: int | None = None  # MTP's guess for the token after `last`
        self.q: torch.Tensor | None = None  # [V] the distribution the draft was drawn from (sampling)
        self.cached_tokens = 0
        self.guide = params.guide() if params.guide is not None else None  # a token mask per step
        self.logprobs: list = []  # (token, log-prob, top alternatives) per chosen token, if asked
        self.prompt_logprobs: list | None = None
        self.prefilled = 0  # tokens of context_ids() already in the cache (while being prefilled)
        self.twin: Sequence | None = None  # an identical prompt admitted just before: its pages are shared
        self.images: torch.Tensor | None = None  # [n, D] tokens for the prompt's <image_placeholder> ids, in order
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
        self.error: str | None = None
        self.exception: BaseException | None = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def context_ids(self) -> list[int]:
        """What the cache must hold before the next token: the prompt, or for a sequence preempted
        mid-generation the prompt and every token it made but the newest (fed at the next step)."""
        return self.prompt + self.out[:-1] if self.out else self.prompt

    def preempt(self) -> None:
        """Lose the cache (it is recomputed from context_ids() when the sequence is admitted again)."""
        self.length = self.prefilled = 0
        self.twin, self.draft, self.q = None, None, None

    def finish(self, reason: str, error: str | None = None, exception: BaseException | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.error, self.exception = reason, error, exception

    def add(self, tokens: list[int], eos: set[int]) -> int:
        """Account new tokens in order (EOS, stop sequences, max_tokens); returns how many were
        taken before the sequence finished."""
        p = self.params
        for n, t in enumerate(tokens, 1):
            if self.guide is not None:
                self.guide.accept(t)
            if t in eos and not p.ignore_eos:
                self.finish("stop")
                self._add_text([], final=True)
                return n
            self.out.append(t)
            cut = first_stop(self.out, p.stop_token_ids, len(self.out) - 1) if p.stop_token_ids else None
            if cut is not None:
                del self.out[cut:]
                self.finish("stop")
            full = len(self.out) >= p.max_tokens
            if self.stream is not None:
                if cut is not None:  # the text of the cut tokens goes too
                    self.text = self.stream.tokenizer.decode(self.out)
                elif self._add_text([t], final=full):
                    self.finish("stop")
            if full:
                self.finish("length")
            if self.finish_reason is not None:
                return n
        return len(tokens)

    def _add_text(self, ids: list[int], final: bool) -> bool:
        """Decode new ids onto the text; True when a text stop sequence ended it (text cut there)."""
        if self.stream is None:
            return False
        before = len(self.text)
        self.text += self.stream.push(ids)
        if final:
            self.text += self.stream.flush()
        cut = first_stop(self.text, self.params.stop, before) if self.params.stop else None
        if cut is not None:
            self.text = self.text[:cut]
        return cut is not None

    def take(self) -> tuple[list[int], str]:
        """The tokens and text that became final since the last call. While the sequence runs, a
        tail that might begin a stop sequence is held back until it cannot."""
        running = self.finish_reason is None
        ready_ids = len(self.out) - (held_suffix(self.out, self.params.stop_token_ids) if running else 0)
        ready_text = len(self.text) - (held_suffix(self.text, self.params.stop) if running else 0)
        ids, text = self.out[self.emitted_ids:ready_ids], self.text[self.emitted_text:ready_text]
        self.emitted_ids, self.emitted_text = max(ready_ids, self.emitted_ids), max(ready_text, self.emitted_text)
        return ids, text
