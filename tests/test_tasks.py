"""Synthetic tasks: determinism, disjoint splits, correct worked solutions, safe checking."""

import pytest

from nanoseek.data.tasks import (TASKS, Arithmetic, Countdown, Example, check_countdown, extract_answer,
                                 get_task)


@pytest.mark.parametrize("name", list(TASKS))
def test_examples_are_deterministic(name):
    task = get_task(name)
    a, b = task.examples("train", 50, seed=3), task.examples("train", 50, seed=3)
    assert a == b
    assert a != task.examples("train", 50, seed=4)
    assert len({task.key(ex) for ex in a}) == 50  # distinct problems


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_disjoint(name):
    task = get_task(name)
    train = {task.key(ex) for seed in (0, 1) for ex in task.examples("train", 1000, seed=seed)}
    test = {task.key(ex) for ex in task.examples("test", 200)}
    assert not train & test
    assert all(task.split_of(ex) == "test" for ex in task.examples("test", 50, seed=9))


def test_small_problem_space_runs_out_instead_of_leaking():
    task = Arithmetic(min_digits=1, max_digits=1, ops="+")  # 100 problems, ~10 in test
    test = task.examples("test", 5)
    train = task.examples("train", 60)
    assert not {task.key(e) for e in test} & {task.key(e) for e in train}
    with pytest.raises(ValueError, match="only"):
        task.examples("test", 50)


@pytest.mark.parametrize("name", list(TASKS))
def test_every_answer_checks_and_reasoning_agrees(name):
    task = get_task(name)
    for ex in task.examples("train", 300) + task.examples("test", 100):
        assert task.check(ex.answer, ex), ex
        assert task.check(extract_answer(ex.messages()[1]["content"]), ex)
        last = ex.reasoning.splitlines()[-1]
        if ex.meta["task"] == "arithmetic":
            assert last.rsplit("= ", 1)[1] == ex.answer
            a, b = ex.meta["a"], ex.meta["b"]
            assert ex.meta["result"] == {"+": a + b, "-": a - b, "*": a * b}[ex.meta["op"]]
        else:
            assert last == f"{ex.answer} = {ex.meta['target']}"
        assert not task.check(str(ex.meta.get("result", 0) + 1), ex)
        assert not task.check(None, ex)
        assert len(ex.text()) < 600  # short: the tiny model has a 256-512 token context


def test_arithmetic_reasoning_shows_carries_and_borrows():
    task = Arithmetic()
    exs = task.examples("train", 200)
    add = next(e for e in exs if e.meta["op"] == "+" and "carry 1" in e.reasoning)
    assert add.reasoning.splitlines()[1].startswith("ones: ")
    sub = next(e for e in exs if e.meta["op"] == "-" and e.meta["a"] < e.meta["b"])
    assert "negate" in sub.reasoning and sub.answer.startswith("-")
    mul = next(e for e in exs if e.meta["op"] == "*" and e.meta["b"] >= 10 and e.meta["b"] % 10)
    assert sum(" * " in line for line in mul.reasoning.splitlines()) >= 3  # partial products


def test_arithmetic_check_is_numeric():
    ex = Example("What is 535 + 686?", "", "1221", {"task": "arithmetic", "a": 535, "b": 686, "op": "+", "result": 1221})
    task = Arithmetic()
    for good in ["1221", " 1,221 ", "1221.0", "+1221"]:
        assert task.check(good, ex), good
    for bad in ["1222", "12 21x", "", "1221.5", "one"]:
        assert not task.check(bad, ex), bad


def test_countdown_check():
    numbers, target = [3, 5, 8, 2], 24
    assert check_countdown("(5 - 2) * 8", numbers, target)
    assert check_countdown("8 * 3", numbers, target)                 # not all numbers needed
    assert check_countdown("8 × 3 = 24", numbers, target)            # "= target" and × tolerated
    assert check_countdown("8 / (2 / 6) ", [8, 2, 6], 24)            # exact fractions
    assert not check_countdown("8 * 3 * 1", numbers, target)          # 1 not given
    assert not check_countdown("(5 - 2) * 8 + 3 - 3", numbers, target)  # 3 used twice
    assert not check_countdown("5 * 5 - 1", [5, 1, 3], 24)            # 5 reused
    assert not check_countdown("8 * 2", numbers, target)              # wrong target
    assert not check_countdown("8 / (5 - 5)", [8, 5, 5], 24)          # division by zero
    for hostile in ["__import__('os').system('true')", "2 ** 3", "abs(-24)", "-(-24)", "24.0", "8*3;1", ""]:
        assert not check_countdown(hostile, [24, 2, 3, 8], 24), hostile
    assert not check_countdown(None, numbers, target)


def test_countdown_settings_are_respected():
    task = Countdown(min_numbers=3, max_numbers=3, max_number=10, max_target=50)
    for ex in task.examples("train", 100):
        assert len(ex.meta["numbers"]) == 3 and max(ex.meta["numbers"]) <= 10
        assert 10 <= ex.meta["target"] <= 50 and ex.meta["target"] not in ex.meta["numbers"]


def test_example_formats():
    ex = get_task("countdown").examples("train", 1)[0]
    user, assistant = ex.messages()
    assert user == {"role": "user", "content": ex.prompt}
    assert assistant == {"role": "assistant", "content": f"<answer>{ex.answer}</answer>", "reasoning_content": ex.reasoning}
    assert ex.text() == f"{ex.prompt}\n<think>\n{ex.reasoning}\n</think>\n\n<answer>{ex.answer}</answer>"


def test_direct_text_keeps_only_the_line_that_states_the_result():
    for name in ("arithmetic", "countdown"):
        ex = get_task(name).examples("train", 1, seed=5)[0]
        last = ex.reasoning.splitlines()[-1]
        assert ex.direct_reasoning() == last and "\n" in ex.reasoning
        assert ex.text(direct=True) == f"{ex.prompt}\n<think>\n{last}\n</think>\n\n<answer>{ex.answer}</answer>"
    ex = get_task("arithmetic").examples("train", 1, seed=6)[0]
    assert ex.direct_reasoning() == f"{ex.meta['a']} {ex.meta['op']} {ex.meta['b']} = {ex.meta['result']}"


def test_mixed_has_both_tasks_and_dispatches_check():
    exs = get_task("mixed").examples("train", 100)
    assert {e.meta["task"] for e in exs} == {"arithmetic", "countdown"}
    with pytest.raises(ValueError, match="unknown task"):
        get_task("sudoku")
    with pytest.raises(ValueError, match="split"):
        get_task("arithmetic").examples("valid", 1)
    with pytest.raises(ValueError, match="ops"):
        get_task("arithmetic", ops="/")


def test_extract_answer():
    assert extract_answer("x <answer>1</answer> y <answer> 42 </answer>") == "42"
    assert extract_answer("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert extract_answer("<answer>\n3 + 4\n</answer>") == "3 + 4"
    assert extract_answer("<answer></answer>") is None
    assert extract_answer("<answer>7") is None
    assert extract_answer("\\boxed{unbalanced") is None
    assert extract_answer("no answer here") is None
