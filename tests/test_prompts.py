"""Prompts as data: the two layouts a problem is asked in, the layout a checkpoint was trained in,
and tasks with settings from a --data spec."""

import json

import pytest

from nanoseek.data import get_task, load_data
from nanoseek.data.prompts import checkpoint_layout, prompt_ids, render_prompt, task_from_spec
from nanoseek.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(load_data("arithmetic", n=300), vocab_size=320)


def test_prompt_layouts(tokenizer):
    ex = get_task("arithmetic").examples("test", 1)[0]
    chat = tokenizer.decode(prompt_ids(tokenizer, ex, "chat"))
    assert chat.endswith("<｜Assistant｜><think>\n") and ex.prompt in chat
    text = tokenizer.decode(prompt_ids(tokenizer, ex, "text"))
    assert text == tokenizer.bos_token + f"{ex.prompt}\n<think>\n"
    assert ex.text().startswith(text[len(tokenizer.bos_token):])  # what pretraining trains on
    with pytest.raises(ValueError, match="layout='json'"):
        prompt_ids(tokenizer, ex, "json")


def test_render_prompt_is_the_ids_and_their_text(tokenizer):
    ex = get_task("arithmetic").examples("test", 1)[0]
    text, ids = render_prompt(tokenizer, ex, "text")
    assert ids == prompt_ids(tokenizer, ex, "text") and text == tokenizer.decode(ids)


def test_layout_follows_the_checkpoints_stage(tmp_path):
    assert checkpoint_layout(tmp_path) == "chat"
    (tmp_path / "train_state").mkdir()
    (tmp_path / "train_state" / "state.json").write_text(json.dumps({"stage": "pretrain"}))
    assert checkpoint_layout(tmp_path) == "text"


def test_task_settings_from_the_data_spec():
    task = task_from_spec("arithmetic:max_digits=2,ops=+-")
    assert task.max_digits == 2 and task.ops == "+-"
    assert all(ex.meta["op"] in "+-" for ex in task.examples("train", 20))
    with pytest.raises(ValueError, match="is not key=value"):
        task_from_spec("arithmetic:max_digits")
