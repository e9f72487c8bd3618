"""Reward functions for GRPO, in TRL's shape: batched, and seeing the dataset's columns.

    def my_reward(prompts, completions, **columns) -> list[float | None]: ...
    rewards = parse_rewards(["accuracy", "format=0.1", "my_pkg.rewards:my_reward=0.5"])  # [(name, fn, weight)]
    total, values = score_batch(rewards, prompts, completions, columns)   # total [N], values {name: [N]}

`prompts` are the texts the model saw (the chat template's generation prompt included, so they end
in the ``<think>\\n`` the template opened), `completions` what it wrote (decoded, no EOS). `columns`
are the dataset's columns by name, one entry per completion (data.records.reward_columns: "answer",
"example" and every column of the record), plus what the trainer adds: "completion_ids" (token
ids), "finish_reasons", "group" (the prompt's index: completions of one prompt share it) and
"max_new_tokens". A reward takes what it needs and swallows the rest with **kwargs. None means "does
not apply to this completion": it is left out of the weighted sum (a completion no reward applies
to scores 0).

Built-ins (BUILTIN_REWARDS):
  accuracy  the final answer (last <answer>...</answer>, else last \\boxed{}) checked by the built-in
            task's checker (Countdown accepts any valid expression), else against "answer" exactly,
            as numbers, or by math-verify (nanoseek.data.answers).
  math      the final answer against "answer" with math-verify (LaTeX, fractions, sets, intervals,
            units: \\frac{1}{2} equals 0.5) only: no task checker, no plain string match.
  format    reasoning closed by </think> (opened by the template or by the completion itself),
            then the answer in <answer>...</answer> or \\boxed{}, and nothing after it.
  code      the last ```python block, then the "tests" column, in nanoseek.rl.sandbox; 1.0 if the
            tests ran to the end.
  overlong  DAPO's soft overlong punishment: 0 up to max_new_tokens - cache, then linearly down to
            -1 at the budget (cache = a quarter of it).
  length    Kimi k1.5's length reward within each group: lambda = 0.5 - (len - min)/(max - min);
            lambda for a correct completion, min(0, lambda) for a wrong one.
  verifier  (with --verifier-command) each completion piped to an external checker: see verifier_reward.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import signal
import subprocess
from collections.abc import Callable

import torch

from ..data.answers import is_correct, math_equal
from ..data.tasks import extract_answer
from ..tokenizer import THINK_END, THINK_START
from .sandbox import run_python

RewardFn = Callable[..., list]


# ----------------------------------------------------------------------------- accuracy

def accuracy_reward(prompts, completions, answer=None, example=None, **_) -> list[float]:
    """1.0 when a completion's final answer is right (data.answers.is_correct: the task's checker, else
    exact, numeric or math-verify equality with the "answer" column), else 0.0."""
    answer, example = answer or [None] * len(completions), example or [None] * len(completions)
    return [float(is_correct(c, e, a)) for c, e, a in zip(completions, example, answer)]


def math_reward(prompts, completions, answer, **_) -> list[float | None]:
    """1.0 when the final answer equals the "answer" column by math-verify; None without a reference."""
    return [None if a is None else float(math_equal(extract_answer(c), a)) for c, a in zip(completions, answer)]


# ----------------------------------------------------------------------------- format

_ANSWER_TAIL = re.compile(r"\s*(<answer>.+?</answer>|\\boxed\{.+\})\s*", re.S)


def think_opened_by_prompt(prompt: str) -> bool:
    """True when the prompt leaves a <think> open (R1's template ends with "<｜Assistant｜><think>\\n")."""
    return prompt.rfind(THINK_START) > prompt.rfind(THINK_END)


def is_well_formatted(prompt: str, completion: str) -> bool:
    """"<think>reasoning</think> answer", the answer <answer>...</answer> or \\boxed{...} with nothing
    after it. The opening <think> may be the prompt's (the template opened it) or the completion's
    first token; the reasoning must be non-empty and closed exactly once."""
    text = completion.lstrip()
    if text.startswith(THINK_START):
        text = text[len(THINK_START):]
    elif not think_opened_by_prompt(prompt):
        return False
    if THINK_START in text or text.count(THINK_END) != 1:
        return False
    reasoning, _, rest = text.partition(THINK_END)
    return bool(reasoning.strip()) and _ANSWER_TAIL.fullmatch(rest) is not None


def format_reward(prompts, completions, **_) -> list[float]:
    """1.0 for a well-formatted completion (is_well_formatted), else 0.0."""
    return [float(is_well_formatted(p, c)) for p, c in zip(prompts, completions)]


# ----------------------------------------------------------------------------- length

def overlong_reward(prompts, completions, completion_ids, max_new_tokens, **_) -> list[float]:
    """DAPO's soft overlong punishment (eq. 13) with cache = max_new_tokens // 4:
    0 if L <= Lmax - cache; (Lmax - cache - L) / cache up to Lmax; -1 beyond."""
    cache = max(1, max_new_tokens // 4)
    out = []
    for ids in completion_ids:
        L = len(ids)
        out.append(0.0 if L <= max_new_tokens - cache else -1.0 if L >= max_new_tokens
                   else (max_new_tokens - cache - L) / cache)
    return out


def length_reward(prompts, completions, completion_ids, group, answer=None, example=None, **_) -> list[float]:
    """Kimi k1.5's length reward: within each group lambda = 0.5 - (L - min L) / (max L - min L),
    lambda for a correct completion and min(0, lambda) for a wrong one (0 when all lengths match)."""
    correct = accuracy_reward(prompts, completions, answer, example)
    lengths = [len(ids) for ids in completion_ids]
    bounds: dict = {}
    for g, L in zip(group, lengths):
        lo, hi = bounds.get(g, (L, L))
        bounds[g] = (min(lo, L), max(hi, L))
    out = []
    for g, L, ok in zip(group, lengths, correct):
        lo, hi = bounds[g]
        lam = 0.0 if hi == lo else 0.5 - (L - lo) / (hi - lo)
        out.append(lam if ok else min(0.0, lam))
    return out


# ----------------------------------------------------------------------------- code

_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.S)


def extract_code(completion: str) -> str | None:
    """The last fenced code block (```python ... ```) after the reasoning, or None."""
    _, sep, content = completion.rpartition(THINK_END)
    blocks = _CODE_BLOCK.findall(content if sep else completion)
    return blocks[-1] if blocks else None


def passes_tests(completion: str, tests: str, timeout_s: float = 5.0, memory_mb: int = 256) -> bool:
    """The completion's code, then `tests`, ran to the end in the sandbox (an early exit fails)."""
    code = extract_code(completion)
    return code is not None and run_python(code, tests=tests or "", timeout_s=timeout_s, memory_mb=memory_mb).ok


def code_reward(prompts, completions, tests=None, example=None, **_) -> list[float]:
    """1.0 when a completion's code passes its "tests" column (or example.meta["tests"]) in the sandbox."""
    if tests is None:
        tests = [(getattr(e, "meta", None) or {}).get("tests", "") for e in example or [None] * len(completions)]
    return [float(passes_tests(c, t)) for c, t in zip(completions, tests)]


# ----------------------------------------------------------------------------- an external checker

def verifier_reward(command: list[str] | str, timeout_s: float = 10.0) -> RewardFn:
    """A reward that runs `command` once per completion (a proof checker, a unit-test runner, a judge).

    The checker reads one JSON object on stdin: {"prompt", "completion", "answer", and every other
    JSON-serialisable column}. Its score is the last line of its stdout if that is a number, else 1.0
    for exit status 0 and 0.0 otherwise. A checker that runs past `timeout_s` is killed with its whole
    process group and scores 0.0. The checker is the user's own, trusted code: it is not sandboxed.
    """
    argv = command.split() if isinstance(command, str) else list(command)
    if not argv:
        raise ValueError("verifier reward: empty --verifier-command")

    def verifier(prompts, completions, **columns) -> list[float]:
        scores = []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            record = {"prompt": p, "completion": c}
            record.update({k: v[i] for k, v in columns.items() if _jsonable(v[i])})
            scores.append(_run_checker(argv, json.dumps(record), timeout_s))
        return scores

    return verifier


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _run_checker(argv: list[str], stdin: str, timeout_s: float) -> float:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True, text=True)
    try:
        out, _ = proc.communicate(stdin, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return 0.0
    lines = out.strip().splitlines()
    try:
        value = float(lines[-1])
        return value if math.isfinite(value) else 0.0
    except (IndexError, ValueError):
        return float(proc.returncode == 0)


# ----------------------------------------------------------------------------- plug-ins

BUILTIN_REWARDS: dict[str, RewardFn] = {"accuracy": accuracy_reward, "math": math_reward, "format": format_reward,
                                        "code": code_reward, "overlong": overlong_reward, "length": length_reward}


def load_reward(spec: str, verifier_command: str | None = None) -> RewardFn:
    """A built-in reward by name, "verifier" (needs verifier_command), or "package.module:function"."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if spec == "verifier":
        if not verifier_command:
            raise ValueError("reward 'verifier' needs --verifier-command (the checker to run)")
        return verifier_reward(verifier_command)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward {spec!r}: expected a built-in ({', '.join(BUILTIN_REWARDS)}, verifier) or "
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


def parse_rewards(specs: list[str], verifier_command: str | None = None) -> list[tuple[str, RewardFn, float]]:
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
        out.append((name, load_reward(name, verifier_command), w))
    return out


def score_batch(rewards: list[tuple[str, RewardFn, float]], prompts: list[str], completions: list[str],
                columns: dict[str, list]) -> tuple[torch.Tensor, dict[str, list]]:
    """(weighted total [N] float32, {name: values with None kept}); a reward that raises or returns
    the wrong number of values names itself."""
    values, total = {}, torch.zeros(len(completions))
    for name, fn, weight in rewards:
        try:
            out = list(fn(prompts, completions, **columns))
        except Exception as e:
            raise RuntimeError(f"reward {name!r} failed on a batch of {len(completions)} (first completion "
                               f"{completions[0][:80]!r}): {e!r}") from e
        if len(out) != len(completions):
            raise ValueError(f"reward {name!r} returned {len(out)} values for {len(completions)} completions")
        values[name] = [None if v is None else float(v) for v in out]
        total += weight * torch.tensor([0.0 if v is None else v for v in values[name]])
    return total, values
