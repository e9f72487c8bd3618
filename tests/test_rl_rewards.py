"""Rewards: accuracy through the task checkers, the format reward with a <think> opened by the chat
template, plug-ins loaded from a module path, weighted totals, and the sandboxed code reward."""

import sys
import textwrap

import pytest

from nanoseek.data.tasks import Example, get_task
from nanoseek.rl.rewards import (accuracy_reward, answers_match, code_reward, extract_code, format_reward,
                                 load_reward, parse_rewards, score, think_opened_by_prompt)
from nanoseek.tokenizer import GENERATION_PROMPT, USER

TEMPLATE_PROMPT = f"<｜begin▁of▁sentence｜>{USER}What is 2 + 3?{GENERATION_PROMPT}"  # ends "<think>\n"
PLAIN_PROMPT = f"<｜begin▁of▁sentence｜>{USER}What is 2 + 3?<｜Assistant｜>"


def test_format_reward_with_think_opened_by_the_template():
    assert think_opened_by_prompt(TEMPLATE_PROMPT) and not think_opened_by_prompt(PLAIN_PROMPT)
    good = "2 + 3 = 5\n</think>\n\n<answer>5</answer>"
    assert format_reward(TEMPLATE_PROMPT, good) == 1.0  # the completion starts inside the reasoning
    assert format_reward(TEMPLATE_PROMPT, "<think>\n" + good) == 1.0  # the model re-opened it: still fine
    assert format_reward(PLAIN_PROMPT, good) == 0.0  # nobody opened <think>
    assert format_reward(PLAIN_PROMPT, "<think>" + good) == 1.0
    assert format_reward(TEMPLATE_PROMPT, "2 + 3 = 5\n</think>\n\n\\boxed{5}") == 1.0


@pytest.mark.parametrize("completion", [
    "2 + 3 = 5 <answer>5</answer>",                         # reasoning never closed
    "\n</think>\n\n<answer>5</answer>",                      # empty reasoning
    "a</think>b</think><answer>5</answer>",                  # closed twice
    "a\n</think>\n\n<answer>5</answer> and more text",       # text after the answer
    "a\n</think>\n\nthe answer is 5",                        # no answer tags
    "a <think> b</think><answer>5</answer>",                 # a second <think> inside
])
def test_format_reward_rejects(completion):
    assert format_reward(TEMPLATE_PROMPT, completion) == 0.0


def test_accuracy_reward_uses_the_task_checker():
    arith = get_task("arithmetic").examples("test", 1, seed=0)[0]
    right = f"working\n</think>\n\n<answer>{arith.answer}</answer>"
    assert accuracy_reward(TEMPLATE_PROMPT, right, arith) == 1.0
    assert accuracy_reward(TEMPLATE_PROMPT, right.replace(arith.answer, arith.answer + "1"), arith) == 0.0
    assert accuracy_reward(TEMPLATE_PROMPT, "no answer at all", arith) == 0.0
    assert accuracy_reward(TEMPLATE_PROMPT, f"\\boxed{{{arith.answer}}}", arith) == 1.0
    countdown = Example("Make 10 from 2, 5, 3.", "", "2 * 5", {"task": "countdown", "numbers": [2, 5, 3], "target": 10})
    assert accuracy_reward("", "<answer>5 * 2</answer>", countdown) == 1.0  # another valid expression
    assert accuracy_reward("", "<answer>5 * 5 - 15</answer>", countdown) == 0.0  # 15 is not given


def test_accuracy_reward_without_a_task_compares_answers():
    ex = Example("?", "", "12", {})
    assert accuracy_reward("", "<answer> 12.0 </answer>", ex) == 1.0
    assert accuracy_reward("", "<answer>13</answer>", {"answer": "13"}) == 1.0
    assert answers_match("1,000", "1000") and answers_match("7/2", "3.5") and not answers_match("x", "y")
    assert not answers_match(None, "1")
    with pytest.raises(ValueError, match="neither"):
        accuracy_reward("", "<answer>1</answer>", Example("?", "", None, {}))


def test_plugin_reward_from_a_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        LIMIT = 3
        def brevity(prompt, completion, example):
            return 1.0 if len(completion) <= LIMIT else 0.0
        class Holder:
            @staticmethod
            def nested(prompt, completion, example):
                return 0.25
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward("my_rewards:brevity")
    assert fn("p", "abc", None) == 1.0 and fn("p", "abcd", None) == 0.0
    assert load_reward("my_rewards:Holder.nested")("p", "c", None) == 0.25
    rewards = parse_rewards(["accuracy", "my_rewards:brevity=0.5"])
    assert [(n, w) for n, _, w in rewards] == [("accuracy", 1.0), ("my_rewards:brevity", 0.5)]
    values = score(rewards, "p", "<answer>12</answer>", Example("?", "", "12", {}))
    assert values == {"accuracy": 1.0, "my_rewards:brevity": 0.0, "total": 1.0}
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize("spec, match", [
    ("nonexistent_module_xyz:fn", "cannot import"), ("os:no_such_function", "no attribute"),
    ("os:sep", "not a callable"), ("accurcy", "built-in"), ("accuracy=heavy", "not a number"),
])
def test_bad_reward_specs_are_named(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_rewards([spec])


def test_a_failing_reward_names_itself():
    def broken(prompt, completion, example):
        raise KeyError("oops")
    with pytest.raises(RuntimeError, match="reward 'broken'"):
        score([("broken", broken, 1.0)], "p", "c", None)


def test_code_reward_runs_the_tests_in_the_sandbox():
    ex = Example("Write double(x).", "", "", {"tests": "assert double(2) == 4\nassert double(-1) == -2"})
    good = "think\n</think>\n\n```python\ndef double(x):\n    return 2 * x\n```"
    bad = good.replace("2 * x", "x + 2")
    assert extract_code(good).strip().startswith("def double")
    assert code_reward("", good, ex) == 1.0
    assert code_reward("", bad, ex) == 0.0
    assert code_reward("", "no code here", ex) == 0.0
