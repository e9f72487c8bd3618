"""Split a reasoning model's completion into `reasoning_content` and `content`, as it streams.

    split = ReasoningSplitter(inside=True)          # the prompt ended with an open <think>
    for piece in pieces:
        reasoning, content = split.feed(piece)      # deltas, either may be ""
    reasoning, content = split.flush()

Text between <think> and </think> is reasoning, the rest is content. When the chat template opens
<think> in the prompt (DeepSeek-R1's does), the completion starts inside the reasoning; a model
that writes <think> itself is understood either way. A marker split over several pieces is held
back until it is whole. Both parts lose their surrounding whitespace, so feeding a whole
completion at once gives ``tokenizer.split_reasoning``'s answer; feeding it piece by piece gives
the same text in deltas.
"""

from __future__ import annotations

from ..tokenizer import THINK_END, THINK_START


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
                keep = next((k for k in range(len(self.end_marker) - 1, 0, -1)
                             if head.endswith(self.end_marker[:k])), 0)
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


def split_all(text: str, inside: bool) -> tuple[str, str]:
    """The whole completion at once -> (reasoning_content, content)."""
    s = ReasoningSplitter(inside)
    r1, c1 = s.feed(text)
    r2, c2 = s.flush()
    return r1 + r2, c1 + c2
