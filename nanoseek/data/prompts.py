"""Prompts as data: how a built-in task's problem is put to a model, in one place for evaluation,
GRPO rollouts, distillation traces and the demo.

    task = task_from_spec("arithmetic:max_digits=2,ops=+-")      # a task with settings, from a flag
    ids = prompt_ids(tokenizer, example, "chat")                  # or "text" for a base model
    text, ids = render_prompt(tokenizer, example, "text")
    layout = checkpoint_layout("runs/pretrain")                   # "text": it was pretrained only

Two layouts, both ending in an open <think>: "chat" is the chat template's user turn (or a
dataset's own messages, meta["prompt_messages"]) plus its generation prompt (what SFT and GRPO train); "text" is ``{prompt}\\n<think>\\n``, the layout of
Example.text that pretraining trains (DeepSeek-R1-Zero's RL straight from a base model).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..tokenizer import THINK_START, Tokenizer
from ..train.state import TRAIN_STATE
from .tasks import Example, get_task

LAYOUTS = ("chat", "text")


def task_from_spec(spec: str):
    """A built-in task from "name" or "name:key=value,key=value" (integers parsed as such)."""
    name, _, settings = spec.partition(":")
    kw = {}
    for item in filter(None, settings.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"data={spec!r}: task setting {item!r} is not key=value")
        kw[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    try:
        return get_task(name, **kw)
    except TypeError as e:
        raise ValueError(f"data={spec!r}: {e}") from None


def prompt_ids(tokenizer: Tokenizer, example: Example, layout: str = "chat") -> list[int]:
    """The problem as the model is asked it: a chat user turn + generation prompt, or the text layout."""
    if layout == "chat":
        messages = (example.meta or {}).get("prompt_messages") or [{"role": "user", "content": example.prompt}]
        return tokenizer.encode_chat(messages, add_generation_prompt=True)[0]
    if layout == "text":
        return tokenizer.encode(f"{example.prompt}\n{THINK_START}\n", add_bos=tokenizer.bos_id is not None)
    raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")


def render_prompt(tokenizer: Tokenizer, example: Example, layout: str = "chat") -> tuple[str, list[int]]:
    """(text, ids) of the problem as the model is asked it (prompt_ids, decoded too: rewards read the text)."""
    ids = prompt_ids(tokenizer, example, layout)
    return tokenizer.decode(ids), ids


def checkpoint_layout(path: str | Path) -> str:
    """The layout a checkpoint was trained in: "text" after pretraining, else "chat" (SFT, GRPO, or a
    checkpoint without training state, such as a released chat model)."""
    state = Path(path) / TRAIN_STATE / "state.json"
    if state.exists():
        return "text" if json.loads(state.read_text()).get("stage") == "pretrain" else "chat"
    return "chat"
