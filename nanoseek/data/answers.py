"""Is a final answer right? One rule for rewards, evaluation and rejection sampling.

    check_answer("1/2", example)            # the built-in task's checker, else exact, numeric, math-verify
    is_correct(completion, example)         # the completion's last <answer>/\\boxed{}, checked

A built-in task's example (meta["task"]) is checked by the task (Countdown accepts any valid
expression). Any other example is compared with its reference `answer`: equal after trimming,
equal as numbers ("12.0" == "12", "7/2" == "3.5"), or equal by math-verify (LaTeX, fractions, sets,
intervals, units: "\\frac{1}{2}" == "0.5") when that package is installed.
"""

from __future__ import annotations

from fractions import Fraction

from .tasks import TASKS, Example, extract_answer, get_task

_TASKS: dict = {}


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


def _math_parse(text: str):
    from math_verify import parse
    return parse(f"${text}$") or parse(text)


def math_equal(predicted: str | None, reference: str) -> bool:
    """math-verify's equivalence of two answers (LaTeX or plain): \\frac{1}{2} == 0.5, {1,2} == {2,1}."""
    from math_verify import verify
    if predicted is None:
        return False
    gold, pred = _math_parse(str(reference)), _math_parse(predicted)
    return bool(gold and pred and verify(gold, pred))


def task_of(example):
    """The built-in task that made `example` (its meta names it), or None."""
    name = (getattr(example, "meta", None) or {}).get("task")
    if name not in TASKS:
        return None
    if name not in _TASKS:
        _TASKS[name] = get_task(name)
    return _TASKS[name]


def check_answer(predicted: str | None, example: Example | None = None, answer: str | None = None) -> bool:
    """`predicted` solves `example` (its task's checker) or equals `answer` (default example.answer)."""
    task = task_of(example)
    if task is not None:
        return bool(task.check(predicted, example))
    reference = answer if answer is not None else getattr(example, "answer", None)
    if reference is None:
        raise ValueError("no reference answer: the example has neither a built-in task in meta nor an 'answer'")
    if predicted is None:
        return False
    if answers_match(predicted, reference):
        return True
    try:
        return math_equal(predicted, reference)
    except ImportError:
        return False


def is_correct(completion: str, example: Example | None = None, answer: str | None = None) -> bool:
    """The completion's final answer (last <answer>...</answer>, else \\boxed{}) is right."""
    return check_answer(extract_answer(completion), example, answer)
