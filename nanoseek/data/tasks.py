"""Built-in synthetic reasoning tasks: a corpus for pretraining/SFT and checkable problems for GRPO.

    task = get_task("countdown")
    train = task.examples("train", 1000, seed=0)
    ex = train[0]; ex.messages(); ex.text()
    task.check(extract_answer(completion), ex)   # True/False, the RL reward

Tasks: "arithmetic" (multi-digit + - * with column-by-column working), "countdown" (reach a target
from 3-4 numbers with + - * /), "mixed" (both). Every example has a worked `reasoning` whose last
line states the result, and an `answer` the assistant writes as ``<answer>{answer}</answer>``.

Train and test splits are disjoint by construction: a problem's split is fixed by a hash of the
problem itself (operands and operator; numbers and target), so whatever the seed, no test problem
can appear in train. Generation is deterministic given (task settings, split, seed).
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction

from nanoseek.tokenizer import THINK_END, THINK_START


@dataclass
class Example:
    """One problem with its worked solution. `meta` holds what `check` needs (task, operands...)."""
    prompt: str
    reasoning: str
    answer: str
    meta: dict = field(default_factory=dict)

    def messages(self) -> list[dict]:
        """The example as a chat: the user asks, the assistant reasons then answers in <answer> tags."""
        return [{"role": "user", "content": self.prompt},
                {"role": "assistant", "content": f"<answer>{self.answer}</answer>",
                 "reasoning_content": self.reasoning}]

    def text(self, direct: bool = False) -> str:
        """A pretraining document in the chat's answer layout, so pretraining already teaches it:
        ``{prompt}\\n<think>\\n{reasoning}\\n</think>\\n\\n<answer>{answer}</answer>``. direct=True
        keeps only the reasoning's last line, which states the result (e.g. "417 + 85 = 502"): the
        answer written straight down, without the worked steps (see `direct_reasoning`)."""
        reasoning = self.direct_reasoning() if direct else self.reasoning
        return (f"{self.prompt}\n{THINK_START}\n{reasoning}\n{THINK_END}\n\n"
                f"<answer>{self.answer}</answer>")

    def direct_reasoning(self) -> str:
        """The one-line "reasoning" of a direct answer: the worked reasoning's last line."""
        return self.reasoning.rsplit("\n", 1)[-1]


_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced braces: truncated output


def extract_answer(text: str) -> str | None:
    """The final answer in `text`: the last <answer>...</answer>, else the last \\boxed{...};
    None when there is none or it is empty."""
    found = _ANSWER_RE.findall(text)
    answer = found[-1] if found else _last_boxed(text)
    answer = answer.strip() if answer is not None else None
    return answer or None


def _in_test_split(key: str, test_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h / 2**64 < test_fraction


class Task:
    """A family of generated problems. Subclasses implement generate, key and check."""
    name = "task"
    test_fraction = 0.1

    def generate(self, rng: random.Random) -> Example | None:
        """One random example (None: rejected, draw again)."""
        raise NotImplementedError

    def key(self, example: Example) -> str:
        """The problem's identity, which decides its split."""
        raise NotImplementedError

    def check(self, answer: str | None, example: Example) -> bool:
        """Whether `answer` (e.g. from extract_answer) solves `example`."""
        raise NotImplementedError

    def split_of(self, example: Example) -> str:
        return "test" if _in_test_split(self.key(example), self.test_fraction) else "train"

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """`n` distinct examples of `split` ("train" or "test"), deterministic in `seed`."""
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r}: must be 'train' or 'test'")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out, seen = [], set()
        for _ in range(100 * n + 1000):
            if len(out) == n:
                return out
            ex = self.generate(rng)
            if ex is None or self.split_of(ex) != split or self.key(ex) in seen:
                continue
            seen.add(self.key(ex))
            out.append(ex)
        if len(out) == n:
            return out
        raise ValueError(f"task {self.name!r}: found only {len(out)} distinct {split} problems of the "
                         f"{n} asked for; allow larger numbers or ask for fewer")


# -- arithmetic -------------------------------------------------------------------------------

_PLACES = ["ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands"]


def _place(k: int) -> str:
    return _PLACES[k] if k < len(_PLACES) else f"10^{k}"


def _digits(x: int, n: int) -> list[int]:
    """The n lowest digits of x, least significant first."""
    return [(x // 10**k) % 10 for k in range(n)]


def _add_steps(a: int, b: int) -> list[str]:
    """Column addition with carries: one line per column."""
    n = len(str(max(a, b)))
    lines, carry = ["Add column by column from the right, carrying."], 0
    for k, (x, y) in enumerate(zip(_digits(a, n), _digits(b, n))):
        s = x + y + carry
        lines.append(f"{_place(k)}: {x} + {y} + {carry} = {s}, write {s % 10}, carry {s // 10}")
        carry = s // 10
    if carry:
        lines.append(f"{_place(n)}: write the carry {carry}")
    return lines


def _sub_steps(a: int, b: int) -> list[str]:
    """Column subtraction with borrows; a negative difference is computed as -(b - a)."""
    lines = []
    top, bottom = (a, b) if a >= b else (b, a)
    if a < b:
        lines.append(f"{b} is larger than {a}, so compute {b} - {a} and negate.")
    lines.append("Subtract column by column from the right, borrowing.")
    borrow = 0
    for k, (x, y) in enumerate(zip(_digits(top, len(str(top))), _digits(bottom, len(str(top))))):
        if x - borrow >= y:
            lines.append(f"{_place(k)}: {x} - {y} - {borrow} = {x - y - borrow}, borrow 0")
            borrow = 0
        else:
            lines.append(f"{_place(k)}: {x + 10} - {y} - {borrow} = {x + 10 - y - borrow}, borrow 1")
            borrow = 1
    if a < b:
        lines.append(f"{top} - {bottom} = {top - bottom}")
    return lines


def _mul_steps(a: int, b: int) -> list[str]:
    """Long multiplication: a partial product per nonzero digit of b, then a running sum."""
    lines = [f"Multiply {a} by each digit of {b}, then add the partial products."]
    partials = [a * d * 10**k for k, d in enumerate(_digits(b, len(str(b)))) if d]
    for k, d in enumerate(_digits(b, len(str(b)))):
        if d:
            lines.append(f"{a} * {d * 10**k} = {a * d * 10**k}")
    total = partials[0] if partials else 0
    for p in partials[1:]:
        lines.append(f"{total} + {p} = {total + p}")
        total += p
    return lines


_OPS = {"+": (lambda a, b: a + b, _add_steps), "-": (lambda a, b: a - b, _sub_steps),
        "*": (lambda a, b: a * b, _mul_steps)}
_NUMBER_RE = re.compile(r"[+-]?\d+(\.0*)?")


def _parse_int(answer: str) -> int | None:
    s = answer.replace(",", "").replace(" ", "")
    return int(s.split(".")[0]) if _NUMBER_RE.fullmatch(s) else None


@dataclass
class Arithmetic(Task):
    """a op b with op in `ops`; operands have min_digits..max_digits digits (the second factor of a
    product at most max_mul_digits, which bounds the number of partial products)."""
    min_digits: int = 2
    max_digits: int = 3
    max_mul_digits: int = 2
    ops: str = "+-*"
    name = "arithmetic"

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"min_digits={self.min_digits}, max_digits={self.max_digits}: "
                             "need 1 <= min_digits <= max_digits")
        if not self.ops or set(self.ops) - set(_OPS):
            raise ValueError(f"ops={self.ops!r}: must be a non-empty subset of '+-*'")

    def _operand(self, rng: random.Random, max_digits: int) -> int:
        n = rng.randint(min(self.min_digits, max_digits), max_digits)
        return rng.randint(10 ** (n - 1) if n > 1 else 0, 10**n - 1)

    def generate(self, rng: random.Random) -> Example:
        op = rng.choice(self.ops)
        a = self._operand(rng, self.max_digits)
        b = self._operand(rng, min(self.max_digits, self.max_mul_digits) if op == "*" else self.max_digits)
        fn, steps = _OPS[op]
        result = fn(a, b)
        reasoning = "\n".join(steps(a, b) + [f"{a} {op} {b} = {result}"])
        return Example(f"What is {a} {op} {b}?", reasoning, str(result),
                       {"task": self.name, "a": a, "b": b, "op": op, "result": result})

    def key(self, example: Example) -> str:
        m = example.meta
        return f"arithmetic:{m['a']}{m['op']}{m['b']}"

    def check(self, answer: str | None, example: Example) -> bool:
        return answer is not None and _parse_int(answer) == example.meta["result"]


# -- countdown --------------------------------------------------------------------------------

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


def _combine(x: tuple, y: tuple, op: str) -> tuple:
    """(value, expr, precedence) of x op y, parenthesizing only where precedence needs it."""
    (vx, ex, px), (vy, ey, py) = x, y
    p = _PREC[op]
    left = f"({ex})" if px < p else ex
    right = f"({ey})" if py < p or (py == p and op in "-/") else ey
    value = {"+": vx + vy, "-": vx - vy, "*": vx * vy, "/": vx // vy if vy else 0}[op]
    return value, f"{left} {op} {right}", p


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    """Exact value of an expression of integer literals and + - * /; anything else is rejected."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
        a, b = _evaluate(node.left, used), _evaluate(node.right, used)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if b == 0:
            raise ZeroDivisionError
        return a / b
    raise ValueError(f"not allowed in a countdown expression: {type(node).__name__}")


def check_countdown(expression: str | None, numbers: list[int], target: int) -> bool:
    """True iff `expression` (optionally followed by "= target") uses only + - * / and the given
    numbers, each at most once, and evaluates exactly to `target`. Parsed with ast, never eval."""
    if not expression or len(expression) > 200:
        return False
    expr = expression.replace("×", "*").replace("÷", "/").split("=")[0].strip()
    used: list[int] = []
    try:
        value = _evaluate(ast.parse(expr, mode="eval").body, used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return False
    return value == target and not Counter(used) - Counter(numbers)


@dataclass
class Countdown(Task):
    """Reach a target from min_numbers..max_numbers numbers in 1..max_number with + - * /, each
    number used at most once. Targets are built by combining random numbers, so always reachable."""
    min_numbers: int = 3
    max_numbers: int = 4
    max_number: int = 25
    max_target: int = 200
    name = "countdown"

    def __post_init__(self):
        if not 2 <= self.min_numbers <= self.max_numbers:
            raise ValueError(f"min_numbers={self.min_numbers}, max_numbers={self.max_numbers}: "
                             "need 2 <= min_numbers <= max_numbers")
        if self.max_number < 2 or self.max_target < 10:
            raise ValueError(f"max_number={self.max_number}, max_target={self.max_target}: "
                             "need max_number >= 2 and max_target >= 10")

    def _step(self, rng: random.Random, pool: list[tuple]) -> tuple[int, int, str] | None:
        """A random legal move (i, j, op) on pool: results stay positive integers, no x/1."""
        i, j = rng.sample(range(len(pool)), 2)
        op = rng.choice("+-*/")
        if op in "-/" and pool[i][0] < pool[j][0]:
            i, j = j, i
        a, b = pool[i][0], pool[j][0]
        if (op == "-" and a == b) or (op == "/" and (b == 1 or a % b)):
            return None
        return i, j, op

    def generate(self, rng: random.Random) -> Example | None:
        count = rng.randint(self.min_numbers, self.max_numbers)
        numbers = [rng.randint(1, self.max_number) for _ in range(count)]
        pool = [(x, str(x), _ATOM) for x in numbers]
        lines = [f"Numbers: {' '.join(map(str, numbers))}. Target: ?"]
        for _ in range(rng.randint(1, len(numbers) - 1)):
            move = None
            for _ in range(20):
                move = self._step(rng, pool)
                if move:
                    break
            if move is None:
                return None
            i, j, op = move
            new = _combine(pool[i], pool[j], op)
            lines.append(f"{pool[i][0]} {op} {pool[j][0]} = {new[0]}")
            pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [new]
            lines[-1] += f", left: {' '.join(str(p[0]) for p in pool)}"
        target, expr, _ = pool[-1]
        if not 10 <= target <= self.max_target or target in numbers:
            return None
        lines[0] = f"Numbers: {' '.join(map(str, numbers))}. Target: {target}."
        lines += [f"Reached {target}.", f"{expr} = {target}"]
        prompt = (f"Using the numbers {', '.join(map(str, numbers))}, make {target}. "
                  "You may use + - * / and each number at most once.")
        return Example(prompt, "\n".join(lines), expr,
                       {"task": self.name, "numbers": numbers, "target": target})

    def key(self, example: Example) -> str:
        return f"countdown:{sorted(example.meta['numbers'])}:{example.meta['target']}"

    def check(self, answer: str | None, example: Example) -> bool:
        return check_countdown(answer, example.meta["numbers"], example.meta["target"])


# -- mixed and the registry ---------------------------------------------------------------------

@dataclass
class Mixed(Task):
    """An even mix of the given tasks; each problem keeps the split it has in its own task."""
    tasks: tuple = field(default_factory=lambda: (Arithmetic(), Countdown()))
    name = "mixed"

    def _task(self, example: Example) -> Task:
        for t in self.tasks:
            if t.name == example.meta["task"]:
                return t
        raise ValueError(f"example of task {example.meta.get('task')!r} is not part of {self.name!r}")

    def generate(self, rng: random.Random) -> Example | None:
        return rng.choice(self.tasks).generate(rng)

    def key(self, example: Example) -> str:
        return self._task(example).key(example)

    def check(self, answer: str | None, example: Example) -> bool:
        return self._task(example).check(answer, example)


TASKS = {"arithmetic": Arithmetic, "countdown": Countdown, "mixed": Mixed}


def get_task(name: str, **settings) -> Task:
    """The built-in task `name` (see TASKS), with optional settings, e.g. max_digits=4."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    return TASKS[name](**settings)
