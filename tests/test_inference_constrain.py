"""Constrained decoding: JSON schemas on a random tiny model, the thinking budget, reasoning left free."""

import json

import pytest
import torch
from conftest import randomize_

from nanoseek.config import ModelConfig
from nanoseek.inference import Batch, Engine, SamplingParams, Sequence
from nanoseek.inference.constrain import Grammar, GuideFactory
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

TEXTS = ['{"name": "ab", "n": 12}', "12+30=42", "the answer is 42", '["a", 1, true, null]'] * 20

SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "boolean"}},
                                            "required": ["b"], "additionalProperties": False}},
     "required": ["a"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": -5, "maximum": 5},
                                      "k": {"type": "integer", "minimum": 10, "maximum": 20}},
     "required": ["x", "k"], "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 4}, "tags": {
        "type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2}},
     "required": ["name", "tags"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tok = Tokenizer.train(TEXTS, vocab_size=300)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=320, eos_token_id=tok.eos_id)
    return Engine(randomize_(Transformer(cfg), scale=0.1), tok), tok


def run(engine, prompt, params, want="stop"):
    seq = Sequence(prompt, params, engine.tokenizer)
    batch = Batch(engine, 1, 400)
    batch.admit([seq])
    while batch.rows:
        batch.leave()
        batch.step()
    assert seq.finish_reason == want, (seq.finish_reason, seq.error, seq.text)
    return seq


@pytest.mark.parametrize("schema", SCHEMAS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates_on_a_random_model(setup, schema, temperature):
    engine, tok = setup
    guide = GuideFactory(tok, Grammar.json_schema(tok, schema), eos=engine.eos_ids)
    seq = run(engine, tok.encode("12+30=", add_bos=True), SamplingParams(200, temperature, seed=1, guide=guide))
    jsonschema.validate(json.loads(seq.text), schema)


def test_reasoning_is_free_then_the_budget_closes_it_and_the_answer_is_constrained(setup):
    engine, tok = setup
    end = tok.token_to_id(tok.think_end)
    guide = GuideFactory(tok, Grammar.json_schema(tok, SCHEMAS[2]), inside_think=True, budget=5, eos=engine.eos_ids)
    seq = run(engine, tok.encode("12+30=", add_bos=True), SamplingParams(200, guide=guide))
    assert seq.out.index(end) <= 5
    reasoning, answer = seq.text.split(tok.think_end, 1)
    jsonschema.validate(json.loads(answer), SCHEMAS[2])
    free = run(engine, tok.encode("12+30=", add_bos=True), SamplingParams(5, ignore_eos=True), "length")
    assert seq.out[:seq.out.index(end)] == free.out[:seq.out.index(end)]  # reasoning unconstrained


def test_a_budget_needs_a_think_token_and_bad_grammars_are_refused(setup):
    _, tok = setup
    with pytest.raises(ValueError, match="grammar"):
        Grammar.lark(tok, "start: (")
    with pytest.raises(ValueError, match="object"):
        Grammar.json_schema(tok, [1])
