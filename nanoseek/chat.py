"""Text around the token ids: chat prompts, incremental decoding, and the reasoning split.

    ids, opens_think = chat_prompt(tokenizer, [{"role": "user", "content": "2+2?"}])
    stream = TextStream(tokenizer); text = stream.push(new_ids) ... + stream.flush()
    split = ReasoningSplitter(inside=opens_think); reasoning, content = split.feed(text)
    held_suffix("abc <th", ["<think>"]) == 3      # characters (or tokens) a stream must hold back

Every caller that turns generated ids into text (the `generate`/`chat` commands, the server, the
inference core's text stop strings) uses these, so a stop string or a `</think>` split over
several tokens is handled one way everywhere.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence

from .tokenizer import THINK_END, THINK_START, Tokenizer


def held_suffix(seq: Sequence, markers: Sequence[Sequence]) -> int:
    """How many trailing items of `seq` could be the start of one of `markers` (a string's
    characters, or a token list's ids): a stream holds them back until the next item decides.

    Only the places where a marker's first item occurs are tried, so the check stays linear in the
    marker's length (it runs after every token of every request).
    """
    best = 0
    for m in markers:
        if not m:
            continue
        first = m[0]
        for i in range(max(len(seq) - len(m) + 1, 0), len(seq) - best):
            if seq[i] == first and seq[i:] == m[:len(seq) - i]:
                best = len(seq) - i
                break
    return best


def find_marker(seq: Sequence, marker: Sequence, start: int = 0) -> int:
    """Index of the first occurrence of `marker` in `seq` at or after `start`, else -1."""
    if isinstance(seq, str):
        return seq.find(marker, start)
    n = len(marker)
    for i in range(max(start, 0), len(seq) - n + 1):
        if seq[i:i + n] == marker:
            return i
    return -1


def first_stop(seq: Sequence, stops: Sequence[Sequence], new_from: int) -> int | None:
    """Where the earliest stop sequence that ends at or after index `new_from` begins, else None
    (each item is checked once when `new_from` is the first new item)."""
    hits = [i for s in stops if (i := find_marker(seq, s, max(new_from - len(s) + 1, 0))) >= 0]
    return min(hits) if hits else None


def chat_prompt(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                continue_final_message: bool = False, **template_kwargs) -> tuple[list[int], bool]:
    """Token ids of the conversation followed by the generation prompt, and whether the template
    opened `<think>` there (DeepSeek-R1's does: the completion then starts inside the reasoning).

    Message text can never forge a turn: the template is rendered around unguessable placeholders,
    its own text is encoded with special tokens and each message's text as plain text, so a user
    typing "<｜Assistant｜>" gives that string's characters, not the special id.
    continue_final_message: the last (assistant) message is left open for the model to go on
    (no generation prompt, nothing rendered after its text). template_kwargs go to a checkpoint's
    own template (tools, enable_thinking...); the built-in one understands thinking=False /
    enable_thinking=False (the reasoning is closed empty, as DeepSeek-V3.1 does).
    """
    if continue_final_message and (not messages or messages[-1].get("role") != "assistant"):
        raise ValueError("continue_final_message needs an assistant message last")
    nonce, holes = secrets.token_hex(8), []

    def hole(text: str | list[int]) -> str:
        holes.append(text)
        return f"\ue000{nonce}:{len(holes) - 1}\ue001"

    # content may also be a list of text pieces and literal token-id lists (an image's placeholder ids)
    masked = [{**m, **{k: hole(m[k]) for k in ("content", "reasoning_content") if isinstance(m.get(k), str) and m[k]},
               **({"content": "".join(hole(p) for p in m["content"])} if isinstance(m.get("content"), list) else {})}
              for m in messages]
    text = tokenizer.apply_chat_template(masked, add_generation_prompt and not continue_final_message,
                                         **template_kwargs)
    if continue_final_message:
        last = messages[-1].get("content") or ""
        end = text.rfind(f":{len(holes) - 1}\ue001") if last else -1
        if end < 0:
            raise ValueError("continue_final_message: the template did not render the final message's content")
        text = text[:end + len(f":{len(holes) - 1}\ue001")]
    elif (add_generation_prompt and tokenizer.own_template is None
          and False in (template_kwargs.get("thinking"), template_kwargs.get("enable_thinking"))):
        text += "\n" + tokenizer.think_end + "\n\n"
    opens_think = text.rstrip().endswith(tokenizer.think_start)
    ids = []
    for i, piece in enumerate(re.split(f"\ue000{nonce}:(\\d+)\ue001", text)):
        if i % 2:
            h = holes[int(piece)]
            ids += list(h) if isinstance(h, list) else tokenizer.encode_text(h)
        elif piece:
            ids += tokenizer.encode(piece)
    return ids, opens_think


class TextStream:
    """Turns a growing list of token ids into text increments.

    Byte-level BPE can split one UTF-8 character over several tokens: the text is re-decoded from
    the first not-yet-printed token and an increment ending in a half character waits for the rest.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = 0  # first token whose text is not fully printed
        self.printed = ""  # text of ids[start:] already given out

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids[self.start:])
        if text.endswith("\ufffd"):
            return ""
        new = text[len(self.printed):]
        self.start, self.printed = len(self.ids), ""
        return new

    def flush(self) -> str:
        """Whatever is still held back (a half character stays as U+FFFD)."""
        new = self.tokenizer.decode(self.ids[self.start:])[len(self.printed):]
        self.start = len(self.ids)
        return new


class _Stripped:
    """One output part given out piece by piece without leading or trailing whitespace: trailing
    whitespace waits until more text follows it."""

    def __init__(self):
        self.started, self.pending = False, ""

    def add(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.pending + text
        body = text.rstrip()
        self.pending = text[len(body):]
        return body


class ReasoningSplitter:
    """Splits a reasoning model's completion into `reasoning_content` and `content` as it streams.

        split = ReasoningSplitter(inside=True)      # the prompt ended with an open <think>
        for piece in pieces:
            reasoning, content = split.feed(piece)  # deltas, either may be ""
        reasoning, content = split.flush()

    Text between <think> and </think> is reasoning, the rest is content. When the chat template
    opens <think> in the prompt, the completion starts inside the reasoning; a model that writes
    <think> itself is understood either way. A marker split over several pieces is held back until
    it is whole. Both parts lose their surrounding whitespace, so feeding a whole completion at
    once gives ``tokenizer.split_reasoning``'s answer; piece by piece gives the same text in deltas.
    """

    def __init__(self, inside: bool, start: str = THINK_START, end: str = THINK_END):
        self.start_marker, self.end_marker = start, end
        self.state = "start"  # "start" (a <think> may still open), "reasoning" or "content"
        self.inside = inside
        self.buffer = ""  # text not yet assigned: a possible marker
        self.reasoning, self.content = _Stripped(), _Stripped()

    def feed(self, text: str) -> tuple[str, str]:
        """New text -> (reasoning delta, content delta)."""
        self.buffer += text
        r = c = ""
        if self.state == "start":
            head = self.buffer.lstrip()
            if head.startswith(self.start_marker):
                self.state, self.buffer = "reasoning", head[len(self.start_marker):]
            elif self.start_marker.startswith(head):
                return "", ""  # "", "<", "<th"...: wait for more
            else:
                self.state = "reasoning" if self.inside else "content"
        if self.state == "reasoning":
            head, sep, tail = self.buffer.partition(self.end_marker)
            if sep:
                r = self.reasoning.add(head)
                self.state, self.buffer = "content", tail
            else:
                keep = held_suffix(head, [self.end_marker])
                r = self.reasoning.add(head[:len(head) - keep])
                self.buffer = head[len(head) - keep:]
                return r, ""
        if self.state == "content":
            c, self.buffer = self.content.add(self.buffer), ""
        return r, c

    def flush(self) -> tuple[str, str]:
        """The end of the completion: whatever was held back as a possible marker."""
        text, self.buffer = self.buffer, ""
        if self.state == "start":
            self.state = "reasoning" if self.inside else "content"
        if self.state == "reasoning":
            return self.reasoning.add(text), ""
        return "", self.content.add(text)
