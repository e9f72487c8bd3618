"""DeepSeek's tool-call format (serve/tools.py): rendered calls parse back, malformed ones come back
as content with a note (never an error), and streamed text gives argument deltas that add up."""

import json

from nanoseek.serve.tools import CALLS_BEGIN, ToolCallStream, parse_tool_calls, render_calls

CALLS = [{"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}},
         {"type": "function", "function": {"name": "add", "arguments": json.dumps({"a": 1, "b": [2, 3]})}}]


def test_rendered_calls_parse_back():
    content, calls, note = parse_tool_calls("Let me check." + render_calls(CALLS))
    assert content == "Let me check." and note is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": [2, 3]})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)


def test_a_malformed_call_is_returned_as_content_with_a_note():
    broken = render_calls(CALLS[:1]).replace('{"city": "Paris"}', '{"city": "Par')
    content, calls, note = parse_tool_calls("ok" + broken)
    assert calls == [] and content == "ok" + broken and "not a JSON object" in note
    content, calls, note = parse_tool_calls("ok" + CALLS_BEGIN)  # begun, never written
    assert calls == [] and "no complete call" in note
    assert parse_tool_calls("plain answer") == ("plain answer", [], None)


def test_streamed_argument_deltas_add_up_to_the_calls():
    text = "Sure." + render_calls(CALLS)
    stream, content, args, names = ToolCallStream(), "", {}, {}
    for i in range(0, len(text), 3):  # markers split across pieces
        c, deltas = stream.feed(text[i:i + 3])
        content += c
        for d in deltas:
            names.setdefault(d["index"], d.get("function", {}).get("name"))
            args[d["index"]] = args.get(d["index"], "") + d.get("function", {}).get("arguments", "")
    content += stream.flush()
    assert content == "Sure." and stream.started
    assert [names[i] for i in sorted(names)] == ["get_weather", "add"]
    assert [json.loads(args[i]) for i in sorted(args)] == [{"city": "Paris"}, {"a": 1, "b": [2, 3]}]
