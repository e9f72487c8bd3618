"""Tool calls in DeepSeek's format: rendering tools and calls into the prompt, parsing the model's
calls back into OpenAI ``tool_calls`` (whole or streamed), and the grammar that forces a call.

    messages = for_builtin_template(messages, tools)          # the built-in template lacks tools
    content, calls, note = parse_tool_calls(text)             # OpenAI tool_calls, or a note why not
    parser = ToolCallStream(); content_delta, call_deltas = parser.feed(text_delta)
    lark = call_grammar(tokenizer, tools, parallel=True)      # tool_choice "required" / a named one

DeepSeek-V3/R1 write a call as

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {"arg": 1}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

and read a tool's result between <｜tool▁output▁begin｜> and <｜tool▁output▁end｜>. A checkpoint
with its own chat template renders tools itself (DeepSeek's do); the built-in template gets them
as a system message and rendered text here. The markers are special tokens in DeepSeek's
vocabulary and plain text in a tokenizer without them; parsing reads text either way.
"""

from __future__ import annotations

import json
import re
import uuid

from ..chat import held_suffix

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
OUTPUTS_BEGIN, OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
FENCE_OPEN, FENCE_CLOSE = "\n```json\n", "\n```"

_CALL = re.compile(re.escape(CALL_BEGIN) + r"(?:function)?" + re.escape(SEP) + r"([^\n]*)" + re.escape(FENCE_OPEN)
                   + r"(.*?)" + re.escape(FENCE_CLOSE) + re.escape(CALL_END), re.S)


def render_call(name: str, arguments: str) -> str:
    return f"{CALL_BEGIN}function{SEP}{name}{FENCE_OPEN}{arguments}{FENCE_CLOSE}{CALL_END}"


def render_calls(calls: list[dict]) -> str:
    return CALLS_BEGIN + "".join(render_call(c["function"]["name"], c["function"]["arguments"])
                                 for c in calls) + CALLS_END


def tools_system_text(tools: list[dict]) -> str:
    """The tools, described for a model that has no template of its own for them."""
    lines = ["## Tools", "You can call these functions. To call one, write " + CALLS_BEGIN + CALL_BEGIN
             + "function" + SEP + "NAME, then its arguments as a ```json block, then " + CALL_END + CALLS_END + "."]
    for t in tools:
        f = t["function"]
        lines.append(f"### {f['name']}\n{f.get('description') or ''}\nParameters: "
                     f"{json.dumps(f.get('parameters') or {'type': 'object'}, ensure_ascii=False)}")
    return "\n\n".join(lines)


def for_builtin_template(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Messages the built-in template accepts: tools as a system message, assistant calls and tool
    results as rendered text."""
    out = [{"role": "system", "content": tools_system_text(tools)}] if tools else []
    for m in messages:
        if m["role"] == "tool":
            text = f"{OUTPUTS_BEGIN}{OUTPUT_BEGIN}{m.get('content') or ''}{OUTPUT_END}{OUTPUTS_END}"
            if out and out[-1]["role"] == "user" and out[-1].get("tool_output"):
                out[-1]["content"] += text  # consecutive results: one turn
            else:
                out.append({"role": "user", "content": text, "tool_output": True})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            out.append({**m, "content": (m.get("content") or "") + render_calls(m["tool_calls"])})
        else:
            out.append(m)
    return [{k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id", "tool_output", "name")}
            for m in out]


def _call(i: int, name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def parse_tool_calls(text: str) -> tuple[str, list[dict], str | None]:
    """A whole completion -> (content, tool_calls, note). A completion whose calls are malformed
    (no call, arguments that are not JSON) is returned as plain content with a note saying why."""
    start = text.find(CALLS_BEGIN)
    if start < 0:
        return text, [], None
    calls = [_call(i, m.group(1).strip(), m.group(2).strip()) for i, m in enumerate(_CALL.finditer(text, start))]
    bad = [c["function"]["name"] for c in calls if not _is_json_object(c["function"]["arguments"])]
    if not calls or bad:
        why = f"the arguments of {bad[0]!r} are not a JSON object" if bad else "no complete call was found"
        return text, [], f"the model began a tool call that could not be parsed ({why}); returned as content"
    return text[:start].rstrip(), calls, None


def _is_json_object(s: str) -> bool:
    try:
        return isinstance(json.loads(s), dict)
    except ValueError:
        return False


class ToolCallStream:
    """Streamed completion text -> (content delta, [tool_call deltas]) in OpenAI's chunk shape.

    Content is given out until the calls begin (a possible start of the marker is held back).
    Each call then gives one delta with its id and name, and its arguments in pieces as they come
    (a possible start of the closing fence is held back)."""

    def __init__(self):
        self.content_done, self.held, self.calls = False, "", ""
        self.sent: list[list] = []  # per call: [name sent?, argument characters sent]

    def feed(self, text: str) -> tuple[str, list[dict]]:
        if not self.content_done:
            self.held += text
            i = self.held.find(CALLS_BEGIN)
            if i < 0:
                keep = held_suffix(self.held, [CALLS_BEGIN])
                out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
                return out, []
            out, self.calls, self.content_done = self.held[:i], self.held[i:], True
            return out, self._deltas()
        self.calls += text
        return "", self._deltas()

    def flush(self) -> str:
        """The end: held-back text that never became a call marker."""
        out, self.held = ("" if self.content_done else self.held), ""
        return out

    @property
    def started(self) -> bool:
        return bool(self.sent)

    def _deltas(self) -> list[dict]:
        deltas = []
        for i, part in enumerate(self.calls.split(CALL_BEGIN)[1:]):
            head, sep, args = part.partition(FENCE_OPEN)
            if not sep:
                break  # the name is not complete yet
            if i == len(self.sent):
                name = head.split(SEP, 1)[-1].strip()
                call = _call(i, name, "")
                deltas.append({"index": i, "id": call["id"], "type": "function",
                               "function": {"name": name, "arguments": ""}})
                self.sent.append([True, 0])
            end = args.find(FENCE_CLOSE + CALL_END)
            ready = args[:end] if end >= 0 else args[:len(args) - held_suffix(args, [FENCE_CLOSE + CALL_END])]
            if len(ready) > self.sent[i][1]:
                deltas.append({"index": i, "function": {"arguments": ready[self.sent[i][1]:]}})
                self.sent[i][1] = len(ready)
        return deltas


def _lark_literal(tokenizer, text: str) -> str:
    """A Lark terminal for a marker: its special token when the vocabulary has one, else text."""
    tid = tokenizer.token_to_id(text)
    return f"<[{tid}]>" if tid is not None else json.dumps(text, ensure_ascii=False)


def call_grammar(tokenizer, tools: list[dict], parallel: bool) -> str:
    """Lark grammar (llguidance) of one call (or several when parallel) of `tools`, each call's
    arguments valid JSON for its parameters schema."""
    lit = lambda s: _lark_literal(tokenizer, s)  # noqa: E731
    alts = []
    for t in tools:
        f = t["function"]
        schema = json.dumps(f.get("parameters") or {"type": "object"}, ensure_ascii=False)
        alts.append(f'{lit(CALL_BEGIN)} "function" {lit(SEP)} {json.dumps(f["name"] + FENCE_OPEN)} '
                    f'%json {schema} {json.dumps(FENCE_CLOSE)} {lit(CALL_END)}')
    rules = "\n".join(f"call_{i}: {a}" for i, a in enumerate(alts))
    calls = "call+" if parallel else "call"
    return (f"start: {lit(CALLS_BEGIN)} {calls} {lit(CALLS_END)}\n"
            f"call: {' | '.join(f'call_{i}' for i in range(len(alts)))}\n{rules}\n")
