"""Constrained decoding: a token guide per sequence that the ``Batch`` applies where it picks tokens.

    grammar = Grammar.json_schema(tokenizer, {"type": "object", ...})    # or .json_object(), .lark(...)
    params = SamplingParams(256, guide=GuideFactory(tokenizer, grammar, inside_think=True, budget=512))

A guide answers ``allowed(V)`` (a bool mask over the vocabulary, or None for no restriction) and
is told each chosen token by ``accept(t)``. One guide does two jobs in order:

1. **Reasoning.** When the prompt opened ``<think>`` the sequence starts in its reasoning, which is
   free text. With a thinking budget, once that many reasoning tokens are made the only allowed
   token is ``</think>``: the model then goes on with its answer.
2. **Answer.** After ``</think>`` (or from the first token when the prompt did not open it) an
   optional grammar masks every token that cannot continue a valid output; once the grammar is
   complete only EOS is allowed. So a JSON schema constrains the answer, never the reasoning.

The grammar engine is llguidance (Microsoft's, maintained, Rust): it takes a tokenizer.json as is,
compiles JSON schemas and Lark grammars lazily (no per-schema precomputation over the vocabulary),
and computes a mask for a ~100k-token vocabulary in tens of microseconds on a CPU
(benchmarks/grammar_engines.py compares it with xgrammar and outlines-core).
"""

from __future__ import annotations

import json
import threading

import torch

_LL_TOKENIZERS: dict = {}  # id(tokenizer) -> (tokenizer, LLTokenizer): building one reads the vocabulary
_LOCK = threading.Lock()


def ll_tokenizer(tokenizer):
    """The llguidance view of a nanoseek Tokenizer (built once per tokenizer)."""
    import llguidance
    with _LOCK:
        hit = _LL_TOKENIZERS.get(id(tokenizer))
        if hit is None or hit[0] is not tokenizer:
            eos = tokenizer.eos_id
            kw = {} if eos is None else {"eos_token": eos}
            hit = (tokenizer, llguidance.LLTokenizer(tokenizer.to_json(), **kw))
            _LL_TOKENIZERS[id(tokenizer)] = hit
        return hit[1]


class Grammar:
    """A compiled, validated grammar; ``matcher()`` starts a fresh parse of it."""

    def __init__(self, tokenizer, grammar: str):
        import llguidance
        self.tokenizer, self.ll = tokenizer, ll_tokenizer(tokenizer)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.ll)
        if is_error:
            raise ValueError(f"the grammar is not valid: {messages[0]}")
        self.grammar = grammar

    @classmethod
    def json_schema(cls, tokenizer, schema: dict) -> "Grammar":
        """JSON that validates against `schema`, written compactly (no free whitespace, so a model
        cannot wander in it)."""
        import llguidance
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema must be an object")
        return cls(tokenizer, llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), overrides={"whitespace_flexible": False}))

    @classmethod
    def json_object(cls, tokenizer) -> "Grammar":
        """Any JSON object."""
        return cls.json_schema(tokenizer, {"type": "object"})

    @classmethod
    def lark(cls, tokenizer, lark: str) -> "Grammar":
        import llguidance
        return cls(tokenizer, llguidance.LLMatcher.grammar_from_lark(lark))

    def matcher(self):
        import llguidance
        return llguidance.LLMatcher(self.ll, self.grammar, log_level=0)


def bitmask_to_bool(bits: bytes, V: int) -> torch.Tensor:
    """llguidance's mask (one bit per token, little-endian 32-bit words) -> bool [V]; tokens past
    the tokenizer's vocabulary (a model's padding rows) are not allowed."""
    b = torch.frombuffer(bytearray(bits), dtype=torch.uint8)
    mask = ((b[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).flatten().bool()
    if mask.numel() >= V:
        return mask[:V]
    return torch.cat((mask, torch.zeros(V - mask.numel(), dtype=torch.bool)))


class Guide:
    """One sequence's reasoning budget and answer grammar (see the module docstring)."""

    def __init__(self, think_end: int | None, eos: set[int], inside_think: bool = False,
                 budget: int | None = None, grammar: Grammar | None = None):
        if (inside_think and budget is not None) and think_end is None:
            raise ValueError("a thinking budget needs a tokenizer with a </think> token")
        self.think_end, self.eos, self.budget = think_end, sorted(eos), budget
        self.thinking = inside_think and think_end is not None
        self.reasoning_tokens = 0
        self.matcher = grammar.matcher() if grammar is not None else None
        self.error: str | None = None

    def allowed(self, V: int) -> torch.Tensor | None:
        if self.error is not None:
            raise ValueError(self.error)
        if self.thinking:
            if self.budget is None or self.reasoning_tokens < self.budget:
                return None
            only = torch.zeros(V, dtype=torch.bool)
            only[self.think_end] = True
            return only
        if self.matcher is None:
            return None
        if self.matcher.is_stopped():  # complete: the sequence ends here
            only = torch.zeros(V, dtype=torch.bool)
            only[[t for t in self.eos if t < V]] = True
            return only
        mask = bitmask_to_bool(self.matcher.compute_bitmask(), V)
        if self.matcher.is_accepting():
            mask[[t for t in self.eos if t < V]] = True
        return mask

    def accept(self, t: int) -> None:
        """Never raises (it runs while tokens are accounted): a problem shows in the next allowed()."""
        if self.thinking:
            if t == self.think_end:
                self.thinking = False
            else:
                self.reasoning_tokens += 1
            return
        if self.matcher is not None and not self.matcher.is_stopped() and t not in self.eos:
            if not self.matcher.consume_token(t):
                self.error = f"the grammar refused token {t}: {self.matcher.get_error()}"


class GuideFactory:
    """What ``SamplingParams.guide`` holds: makes each sequence its own ``Guide``."""

    def __init__(self, tokenizer, grammar: Grammar | None = None, inside_think: bool = False,
                 budget: int | None = None, eos: set[int] | None = None):
        self.think_end = tokenizer.token_to_id(tokenizer.think_end)
        self.eos = set(eos or ()) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())
        self.grammar, self.inside_think, self.budget = grammar, inside_think, budget
        Guide(self.think_end, self.eos, inside_think, budget)  # refuse a budget without </think> now

    def __call__(self) -> Guide:
        return Guide(self.think_end, self.eos, self.inside_think, self.budget, self.grammar)
