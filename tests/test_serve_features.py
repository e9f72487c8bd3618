"""Tool calls, structured output, log-probs, thinking budget and sampling controls through the API
with the official client, on a random tiny model (so only the constraint makes outputs valid)."""

import json

import pytest
import torch

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from test_inference_constrain import SCHEMAS  # noqa: E402
from test_inference_logits import run  # noqa: E402
from test_serve_api import KEY, TEXTS, tiny_checkpoint, user  # noqa: E402

from nanoseek.chat import chat_prompt  # noqa: E402
from nanoseek.inference import Engine, SamplingParams  # noqa: E402
from nanoseek.inference.scheduler import Scheduler  # noqa: E402
from nanoseek.serve.api import create_app, serve_in_thread  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Tokyo"]},
                                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                          "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 3}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), max_len=1024)
    Tokenizer.train(TEXTS, vocab_size=300).save_pretrained(path)
    engine = Engine.from_pretrained(str(path))
    sched = Scheduler(engine, max_batch=8, queue_size=32).start()
    uv, thread, port = serve_in_thread(create_app(sched, "tiny", api_key=KEY))
    base = f"http://127.0.0.1:{port}"
    yield dict(base=base, engine=engine, path=str(path),
               client=openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120))
    uv.should_exit = True
    thread.join(timeout=10)
    sched.stop()


@pytest.mark.parametrize("schema", SCHEMAS)
def test_json_schema_answers_validate(server, schema):
    resp = server["client"].chat.completions.create(
        model="tiny", messages=user("give JSON"), max_tokens=300, temperature=1.0, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        extra_body={"max_thinking_tokens": 4})
    msg = resp.choices[0].message
    jsonschema.validate(json.loads(msg.content), schema)
    assert resp.choices[0].finish_reason == "stop"


def test_completions_take_a_response_format_too(server):
    r = server["client"].completions.create(model="tiny", prompt="12+30=", max_tokens=200, temperature=0,
                                            extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                                "name": "x", "schema": SCHEMAS[1]}}})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS[1])


def _args(call, tool):
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def test_tool_choice_required_round_trip_whole_and_streamed(server):
    client = server["client"]
    messages = user("weather in Paris?")
    kw = dict(model="tiny", tools=[WEATHER, TIME], tool_choice="required", max_tokens=300, temperature=1.0,
              seed=1, extra_body={"max_thinking_tokens": 2})
    resp = client.chat.completions.create(messages=messages, **kw)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        _args(call, WEATHER if call.function.name == "get_weather" else TIME)
    # streamed: the same call comes back as delta.tool_calls pieces
    calls, finish = {}, None
    for chunk in client.chat.completions.create(messages=messages, stream=True, **kw):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += (d.function.name or "") if d.function else ""
                entry["arguments"] += (d.function.arguments or "") if d.function else ""
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    # the result goes back as a tool message; the model answers
    follow = messages + [{"role": "assistant", "content": None, "tool_calls": [
        c.model_dump() for c in choice.message.tool_calls]}] + [
        {"role": "tool", "tool_call_id": c.id, "content": "sunny"} for c in choice.message.tool_calls]
    answer = client.chat.completions.create(model="tiny", messages=follow, tools=[WEATHER, TIME], max_tokens=8)
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_a_named_tool_choice_calls_that_tool_once(server):
    resp = server["client"].chat.completions.create(
        model="tiny", messages=user("time?"), tools=[WEATHER, TIME], parallel_tool_calls=False, max_tokens=300,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, extra_body={"max_thinking_tokens": 0})
    calls = resp.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_time"
    _args(calls[0], TIME)


def test_chat_logprobs_are_the_models_log_softmax(server):
    engine, tok = server["engine"], server["engine"].tokenizer
    resp = server["client"].chat.completions.create(model="tiny", messages=user("7*6?"), max_tokens=5,
                                                    temperature=0, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    ids = chat_prompt(tok, user("7*6?"))[0]
    out = engine.generate([ids], 5)[0].tokens
    with torch.no_grad():
        lp = engine.model(torch.tensor([ids + out]))[0].float().log_softmax(-1)
    for j, entry in enumerate(content):
        assert abs(entry.logprob - lp[len(ids) - 1 + j, out[j]].item()) < 1e-4
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.logprob - 1e-6


def test_echo_logprobs_of_the_prompt_with_max_tokens_0(server):
    engine, tok = server["engine"], server["engine"].tokenizer
    ids = tok.encode("the answer is 42", add_bos=True)
    r = server["client"].completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=2)
    lps = r.choices[0].logprobs
    with torch.no_grad():
        want = engine.model(torch.tensor([ids]))[0].float().log_softmax(-1)
    assert lps.token_logprobs[0] is None and len(lps.token_logprobs) == len(ids)
    for j in range(1, len(ids)):
        assert abs(lps.token_logprobs[j] - want[j - 1, ids[j]].item()) < 1e-4
    assert r.choices[0].text == tok.decode(ids) and r.usage.completion_tokens == 0


def test_thinking_budget_closes_the_reasoning(server):
    resp = server["client"].chat.completions.create(model="tiny", messages=user("hi"), max_tokens=40,
                                                    temperature=0, extra_body={"max_thinking_tokens": 3})
    tok = server["engine"].tokenizer
    assert len(tok.encode(resp.choices[0].message.reasoning_content or "")) <= 4
    effort = server["client"].chat.completions.create(model="tiny", messages=user("hi"), max_tokens=20,
                                                      temperature=0, reasoning_effort="minimal")
    assert not effort.choices[0].message.reasoning_content


def test_sampling_controls_and_best_of(server):
    client, tok = server["client"], server["engine"].tokenizer
    plain = client.completions.create(model="tiny", prompt="the", max_tokens=8, temperature=0)
    pen = client.completions.create(model="tiny", prompt="the", max_tokens=8, temperature=0,
                                    frequency_penalty=2.0, presence_penalty=2.0,
                                    extra_body={"repetition_penalty": 2.0, "min_p": 0.1})
    params = SamplingParams(8, frequency_penalty=2.0, presence_penalty=2.0, repetition_penalty=2.0, min_p=0.1)
    want = run(server["engine"], params, tok.encode("the", add_bos=True)).out
    assert pen.choices[0].text == tok.decode(want)
    first = server["engine"].generate([tok.encode("the", add_bos=True)], 1)[0].tokens[0]
    banned = client.completions.create(model="tiny", prompt="the", max_tokens=4, temperature=0,
                                       logit_bias={str(first): -100})
    want = run(server["engine"], SamplingParams(4, logit_bias={first: -100}), tok.encode("the", add_bos=True)).out
    assert first not in want and banned.choices[0].text == tok.decode(want)
    stopped = client.completions.create(model="tiny", prompt="the", max_tokens=8, temperature=0,
                                        extra_body={"stop_token_ids": [first]})
    assert stopped.choices[0].text == "" and stopped.choices[0].finish_reason == "stop"
    best = client.completions.create(model="tiny", prompt="the", max_tokens=4, temperature=1.0, seed=0,
                                     n=1, best_of=3, logprobs=0)
    assert len(best.choices) == 1
