"""Reward functions for GRPO: rule-based, as DeepSeek-R1-Zero's, plus plug-ins.

    reward = accuracy_reward(prompt, completion, example)   # 1.0 if the final answer is right
    reward = format_reward(prompt, completion, example)     # 1.0 for <think>...</think> then <answer>
    fn = load_reward("my_pkg.rewards:brevity")              # any callable(prompt, completion, example)
    rewards = parse_rewards(["accuracy", "format=0.5"])     # [(name, fn, weight)] for the trainer

A reward function is a plain callable ``fn(prompt: str, completion: str, example) -> float``:
`prompt` is the text the model saw (the chat template's generation prompt included, so it ends
in the ``<think>\\n`` the template opened), `completion` the text the model wrote (decoded, no
end-of-sentence token), `example` the task's Example (answer, meta) or whatever the data holds.

Built-ins (BUILTIN_REWARDS):
  accuracy  the final answer (last <answer>...</answer>, else last \\boxed{}) checked by the
            task's own checker when the example names a built-in task (Countdown accepts any
            valid expression), else against example.answer exactly or numerically.
  format    reasoning closed by </think> (opened by the template or by the completion itself),
            then the answer in <answer>...</answer> or \\boxed{}, and nothing after it.
  code      the last ```python block of the completion, followed by example.meta["tests"], run
            by nanoseek.rl.sandbox in a separate limited process; 1.0 if it exits cleanly.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from fractions import Fraction

from ..data.tasks import TASKS, extract_answer, get_task
from ..tokenizer import THINK_END, THINK_START
from .sandbox import run_python

RewardFn = Callable[[str, str, object], float]


# ----------------------------------------------------------------------------- accuracy

def _number(text: str) -> Fraction | None:
    """A plain number ("1,234", "-3.50", "7/2") as an exact fraction; None otherwise."""
    s = text.replace(",", "").replace(" ", "").replace("$", "")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str | None, reference: str) -> bool:
    """Exact match after trimming whitespace, else equal as numbers (so "12.0" == "12")."""
    if predicted is None:
        return False
    predicted, reference = predicted.strip(), str(reference).strip()
    if predicted == reference:
        return True
    a, b = _number(predicted), _number(reference)
    return a is not None and a == b


_TASKS: dict = {}


def _task_of(example):
    """The built-in task that made `example` (its meta names it), or None."""
    name = (getattr(example, "meta", None) or {}).get("task")
    if name not in TASKS:
        return None
    if name not in _TASKS:
        _TASKS[name] = get_task(name)
    return _TASKS[name]


def accuracy_reward(prompt: str, completion: str, example) -> float:
    """1.0 when the completion's final answer solves `example`, else 0.0 (also when unparseable)."""
    answer = extract_answer(completion)
    task = _task_of(example)
    if task is not None:
        return float(task.check(answer, example))
    reference = example.get("answer") if isinstance(example, dict) else getattr(example, "answer", None)
    if reference is None:
        raise ValueError("accuracy reward: the example has neither a built-in task in meta nor an 'answer'")
    return float(answers_match(answer, reference))


# ----------------------------------------------------------------------------- format

_ANSWER_TAIL = re.compile(r"\s*(<answer>.+?</answer>|\\boxed\{.+\})\s*", re.S)


def think_opened_by_prompt(prompt: str) -> bool:
    """True when the prompt leaves a <think> open (R1's template ends with "<｜Assistant｜><think>\\n")."""
    return prompt.rfind(THINK_START) > prompt.rfind(THINK_END)


def format_reward(prompt: str, completion: str, example=None) -> float:
    """1.0 for "<think>reasoning</think> answer" where the answer is <answer>...</answer> or
    \\boxed{...} with nothing after it, else 0.0.

    The opening <think> may be the prompt's (the chat template opened it: the completion starts
    inside the reasoning) or the completion's own first token; the reasoning must be non-empty
    and closed exactly once.
    """
    text = completion.lstrip()
    if text.startswith(THINK_START):
        text = text[len(THINK_START):]
    elif not think_opened_by_prompt(prompt):
        return 0.0
    if THINK_START in text or text.count(THINK_END) != 1:
        return 0.0
    reasoning, _, rest = text.partition(THINK_END)
    return float(bool(reasoning.strip()) and _ANSWER_TAIL.fullmatch(rest) is not None)


# ----------------------------------------------------------------------------- code

_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.S)


def extract_code(completion: str) -> str | None:
    """The last fenced code block (```python ... ```) after the reasoning, or None."""
    _, sep, content = completion.rpartition(THINK_END)
    blocks = _CODE_BLOCK.findall(content if sep else completion)
    return blocks[-1] if blocks else None


def code_reward(prompt: str, completion: str, example, timeout_s: float = 5.0, memory_mb: int = 256) -> float:
    """1.0 when the completion's code, followed by the example's tests, runs to a clean exit in the
    sandbox; 0.0 for no code, a failing test, an error, a timeout or a blown memory limit.

    The tests are example.meta["tests"] (or example["tests"]): Python source, typically asserts.
    """
    code = extract_code(completion)
    if code is None:
        return 0.0
    meta = example if isinstance(example, dict) else (getattr(example, "meta", None) or {})
    tests = meta.get("tests", "")
    return float(run_python(code + "\n\n" + tests, timeout_s=timeout_s, memory_mb=memory_mb).ok)


# ----------------------------------------------------------------------------- plug-ins

BUILTIN_REWARDS: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward, "code": code_reward}


def load_reward(spec: str) -> RewardFn:
    """A built-in reward by name, or ``"package.module:function"`` imported from the Python path."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward {spec!r}: expected a built-in ({', '.join(BUILTIN_REWARDS)}) or "
                         "'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({e})") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {attr!r} is a {type(fn).__name__}, not a callable")
    return fn


def parse_rewards(specs: list[str]) -> list[tuple[str, RewardFn, float]]:
    """["accuracy", "format=0.5", "pkg.mod:fn=2"] -> [(name, fn, weight)]; weight defaults to 1."""
    if not specs:
        raise ValueError("at least one reward is needed (e.g. --reward accuracy)")
    out = []
    for spec in specs:
        name, sep, weight = spec.rpartition("=")
        if not sep:
            name, weight = spec, "1"
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"reward {spec!r}: weight {weight!r} is not a number") from None
        out.append((name, load_reward(name), w))
    return out


def score(rewards: list[tuple[str, RewardFn, float]], prompt: str, completion: str, example) -> dict[str, float]:
    """Each reward's value and their weighted sum under "total"; a reward that raises names itself."""
    values = {}
    for name, fn, _ in rewards:
        try:
            values[name] = float(fn(prompt, completion, example))
        except Exception as e:
            raise RuntimeError(f"reward {name!r} failed on completion {completion[:80]!r}: {e!r}") from e
    values["total"] = sum(w * values[name] for name, _, w in rewards)
    return values
