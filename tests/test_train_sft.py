"""SFT: the loss covers exactly the assistant's tokens, a run from a checkpoint folder writes an
"sft" stage that resumes, and bad data gives a clear error or a counted skip."""

import json

import pytest
import torch

from nanoseek import ModelConfig, Transformer, save_pretrained
from nanoseek.data import load_data
from nanoseek.tokenizer import EOS, THINK_END, Tokenizer
from nanoseek.train.loop import TrainConfig
from nanoseek.train.sft import SFTConfig, load_conversations, pack_conversations, sft
from nanoseek.train.state import read_state


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(load_data("arithmetic", n=300), vocab_size=320)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """A micro model (2 layers, hidden 64) with the tokenizer beside it, as pretraining leaves one."""
    path = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                                             intermediate_size=128, moe_intermediate_size=32,
                                             bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    save_pretrained(Transformer(cfg), path)
    tokenizer.save_pretrained(path)
    return path


def quick(steps=2, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=2, micro_batch_size=2, warmup_steps=1, progress=False, **kw)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_targets_are_exactly_the_assistants_tokens(tokenizer):
    convs = load_conversations("arithmetic", n=6, seed=1)
    rows = pack_conversations(convs, tokenizer, seq_len=512, verbose=False)
    assert rows.n_dropped == 0
    # Every document's targets, read in order, spell the assistant's turn and nothing else.
    spelled = []
    for r in range(len(rows)):
        for d in rows.doc_ids[r].unique().tolist():
            if d < 0:
                continue
            sel = rows.doc_ids[r] == d
            t = rows.targets[r][sel]
            spelled.append(tokenizer.decode(t[t != -100].tolist()))
            assert (rows.token_mask[r][sel].sum() == (t != -100).sum())  # first token is never a label
    expected = [f"{c[1]['reasoning_content']}\n{THINK_END}\n\n{c[1]['content']}{EOS}" for c in convs]
    assert sorted(spelled) == sorted(expected)
    prompt_text = convs[0][0]["content"]
    assert all(prompt_text not in s for s in spelled)


def test_sft_from_a_checkpoint_writes_a_resumable_sft_stage(tmp_path, checkpoint):
    out = tmp_path / "sft"
    sft(SFTConfig(out=str(out), model=str(checkpoint), dataset="arithmetic", num_examples=16, seq_len=256,
                  train=quick(steps=3, stop_at=2)))
    state = read_state(out)
    assert state["stage"] == "sft" and state["step"] == 2
    assert state["source"]["model"] == str(checkpoint)
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()
    sft(SFTConfig(out=str(out), model=str(checkpoint), dataset="arithmetic", num_examples=16, seq_len=256,
                  resume=True, train=quick(steps=3)))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)


def test_jsonl_conversations_with_counted_skips(tmp_path, checkpoint, capsys):
    ok = {"messages": [{"role": "user", "content": "What is 2 + 2?"},
                       {"role": "assistant", "content": "<answer>4</answer>", "reasoning_content": "2 + 2 = 4"}]}
    long = {"messages": [{"role": "user", "content": "1 " * 400}, {"role": "assistant", "content": "ok"}]}
    no_answer = {"messages": [{"role": "user", "content": "hello"}]}
    data = write_jsonl(tmp_path / "chats.jsonl", [ok, ok, long, no_answer])
    sft(SFTConfig(out=str(tmp_path / "out"), model=str(checkpoint), dataset=str(data), seq_len=128, train=quick(1)))
    printed = capsys.readouterr().out
    assert "4 conversations" in printed
    assert "1 longer than 128 tokens" in printed and "1 without an assistant turn" in printed


@pytest.mark.parametrize("lines, match", [
    ([], "empty file"),
    (['{"messages": [{"role": "user", "content": "hi"}]}', '{"messages": [oops'], r"chats.jsonl:2: malformed JSON"),
    (['{"messages": [{"role": "robot", "content": "hi"}]}'], r"chats.jsonl:1: messages\[0\] has role 'robot'"),
    (['{"text": "plain text"}'], "plain text.*use `nanoseek pretrain`"),
])
def test_bad_files_are_clear_errors(tmp_path, checkpoint, lines, match):
    data = write_jsonl(tmp_path / "chats.jsonl", lines)
    with pytest.raises(ValueError, match=match):
        sft(SFTConfig(out=str(tmp_path / "out"), model=str(checkpoint), dataset=str(data), train=quick(1)))


def test_nothing_short_enough_is_an_error_naming_seq_len(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="longer than seq_len=16"):
        sft(SFTConfig(out=str(tmp_path / "out"), model=str(checkpoint), dataset="arithmetic", num_examples=4,
                      seq_len=16, train=quick(1)))


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="SFTConfig.model='nowhere'"):
        SFTConfig(out=str(tmp_path), model="nowhere")
    with pytest.raises(ValueError, match="SFTConfig.seq_len"):
        SFTConfig(out=str(tmp_path), model=str(tmp_path), seq_len=1)


def test_command_line_defaults_are_sfts():
    from nanoseek.cli import build_parser
    args = build_parser().parse_args(["sft", "--model", "m", "--out", "o"])
    assert (args.steps, args.lr, args.dataset) == (200, 1e-3, "arithmetic")
