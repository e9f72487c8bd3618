"""Rewards in TRL's shape fn(prompts, completions, **columns): accuracy through the task checkers and
math-verify, the format reward with a <think> opened by the chat template, length shaping, plug-ins
loaded from a module file and called with the dataset's columns, weighted totals with None, the
sandboxed code reward and the external verifier process."""

import sys
import textwrap

import pytest

from nanoseek.data.answers import answers_match
from nanoseek.data.tasks import Example, get_task
from nanoseek.rl import rewards as R
from nanoseek.rl.rewards import extract_code, load_reward, parse_rewards, score_batch, think_opened_by_prompt


def format_reward(prompt, completion, example=None):
    return R.format_reward([prompt], [completion])[0]


def accuracy_reward(prompt, completion, example):
    if isinstance(example, dict):
        return R.accuracy_reward([prompt], [completion], answer=[example["answer"]])[0]
    return R.accuracy_reward([prompt], [completion], answer=[example.answer], example=[example])[0]


def code_reward(prompt, completion, example):
    return R.code_reward([prompt], [completion], example=[example])[0]
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


def test_math_verify_accepts_equivalent_forms():
    answers = ["\\frac{1}{2}", "\\{1, 2\\}", "(0, 1]", "12"]
    completions = ["<answer>0.5</answer>", "\\boxed{\\{2,1\\}}", "<answer>(0,1]</answer>", "<answer>13</answer>"]
    assert R.math_reward(["p"] * 4, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0]
    assert R.math_reward(["p"], ["<answer>1</answer>"], answer=[None]) == [None]  # no reference: does not apply
    assert accuracy_reward("", "<answer>0.5</answer>", {"answer": "\\frac{1}{2}"}) == 1.0  # accuracy falls back to it


def test_length_shaping_hand_computed():
    ids = [[0] * n for n in (4, 13, 15, 16)]
    assert R.overlong_reward(None, ["x"] * 4, completion_ids=ids, max_new_tokens=16) == [0.0, -0.25, -0.75, -1.0]
    # Kimi: group 0 lengths 4 (right), 16 (right), 10 (wrong): lambda = 0.5, -0.5, 0
    out = R.length_reward(None, ["<answer>1</answer>", "<answer>1</answer>", "<answer>2</answer>"],
                          completion_ids=[[0] * 4, [0] * 16, [0] * 10], group=[0, 0, 0], answer=["1"] * 3)
    assert out == [0.5, -0.5, 0.0]


def test_verifier_process_scores_each_completion(tmp_path):
    checker = tmp_path / "check.py"
    checker.write_text(textwrap.dedent("""
        import json, sys, time
        rec = json.load(sys.stdin)
        if "slow" in rec["completion"]:
            time.sleep(30)
        if "score" in rec["completion"]:
            print(0.25)
        sys.exit(0 if rec["completion"].strip() == rec["answer"] else 1)
    """))
    fn = R.verifier_reward([sys.executable, str(checker)], timeout_s=2.0)
    import time
    t0 = time.perf_counter()
    out = fn(["p"] * 4, ["42", "41", "score", "slow"], answer=["42"] * 4, example=[object()] * 4)
    assert out == [1.0, 0.0, 0.25, 0.0] and time.perf_counter() - t0 < 10
    rewards = parse_rewards(["verifier=2"], verifier_command=f"{sys.executable} {checker}")
    total, _ = score_batch(rewards, ["p"], ["42"], {"answer": ["42"]})
    assert total.tolist() == [2.0]
    with pytest.raises(ValueError, match="verifier-command"):
        parse_rewards(["verifier"])


def test_plugin_reward_from_a_module_file_sees_the_columns(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        LIMIT = 3
        SEEN = {}
        def brevity(prompts, completions, difficulty, **kwargs):
            SEEN.update(difficulty=difficulty, keys=sorted(kwargs))
            return [1.0 if len(c) <= LIMIT else 0.0 for c in completions]
        class Holder:
            @staticmethod
            def nested(prompts, completions, **kwargs):
                return [None] * len(completions)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward("my_rewards:brevity")
    assert fn(["p", "p"], ["abc", "abcd"], difficulty=[1, 2]) == [1.0, 0.0]
    rewards = parse_rewards(["accuracy", "my_rewards:brevity=0.5", "my_rewards:Holder.nested"])
    assert [(n, w) for n, _, w in rewards] == [("accuracy", 1.0), ("my_rewards:brevity", 0.5),
                                              ("my_rewards:Holder.nested", 1.0)]
    columns = {"answer": ["12", "12"], "difficulty": ["easy", "hard"]}
    total, values = score_batch(rewards, ["p", "p"], ["<answer>12</answer>", "ab"], columns)
    assert total.tolist() == [1.0, 0.5] and values["my_rewards:Holder.nested"] == [None, None]
    import my_rewards
    assert my_rewards.SEEN == {"difficulty": ["easy", "hard"], "keys": ["answer"]}
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize("spec, match", [
    ("nonexistent_module_xyz:fn", "cannot import"), ("os:no_such_function", "no attribute"),
    ("os:sep", "not a callable"), ("accurcy", "built-in"), ("accuracy=heavy", "not a number"),
])
def test_bad_reward_specs_are_named(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_rewards([spec])


def test_a_failing_reward_names_itself():
    def broken(prompts, completions, **kw):
        raise KeyError("oops")
    with pytest.raises(RuntimeError, match="reward 'broken'"):
        score_batch([("broken", broken, 1.0)], ["p"], ["c"], {})
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        score_batch([("short", lambda p, c, **kw: [1.0], 1.0)], ["p", "p"], ["c", "c"], {})


def test_code_reward_runs_the_tests_in_the_sandbox():
    ex = Example("Write double(x).", "", "", {"tests": "assert double(2) == 4\nassert double(-1) == -2"})
    good = "think\n</think>\n\n```python\ndef double(x):\n    return 2 * x\n```"
    bad = good.replace("2 * x", "x + 2")
    assert extract_code(good).strip().startswith("def double")
    assert code_reward("", good, ex) == 1.0
    assert code_reward("", bad, ex) == 0.0
    assert code_reward("", "no code here", ex) == 0.0
