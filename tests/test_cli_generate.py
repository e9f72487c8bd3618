"""`nanoseek generate` and `nanoseek chat` on a tiny saved model with a tiny trained tokenizer."""

import io

import pytest
import torch
from conftest import randomize_

from nanoseek import cli
from nanoseek.hf import save_pretrained
from nanoseek.config import ModelConfig
from nanoseek.inference import Engine
from nanoseek.chat import chat_prompt
from nanoseek.cli.generate import ReplyPrinter
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer

TEXTS = ["12+30=42", "7*6=42", "the answer is 42", "héllo wörld ✓", "think first, then answer"] * 20


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = randomize_(Transformer(ModelConfig.preset("tiny")), scale=0.1)
    save_pretrained(model, path)
    Tokenizer.train(TEXTS, vocab_size=300).save_pretrained(path)
    return str(path)


def run_cli(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_prints_the_engines_greedy_continuation(ckpt, capsys):
    code, out, _ = run_cli(["generate", "--model", ckpt, "--prompt", "12+30=", "--max-new-tokens", "12"], capsys)
    engine = Engine.from_pretrained(ckpt)
    tok = engine.tokenizer
    ids = engine.generate([tok.encode("12+30=", add_bos=True)], 12)[0].tokens
    assert code == 0
    assert out == "12+30=" + tok.decode(ids) + "\n"


def test_generate_speculative_and_batch_match_plain(ckpt, capsys):
    base = ["generate", "--model", ckpt, "--max-new-tokens", "10", "--prompt", "7*6=", "--prompt", "the"]
    _, plain, plain_err = run_cli(base + ["--speculative", "off", "--stats"], capsys)
    _, spec, err = run_cli(base + ["--speculative", "mtp", "--stats"], capsys)
    _, auto, auto_err = run_cli(base + ["--stats"], capsys)  # the default: mtp, as the model has an MTP module
    assert plain == spec == auto and plain.count("--- [") == 2
    assert "MTP acceptance" in err and "tokens/forward" in err and "MTP acceptance" in auto_err
    assert "MTP acceptance" not in plain_err
    _, alone, _ = run_cli(["generate", "--model", ckpt, "--max-new-tokens", "10", "--prompt", "the"], capsys)
    assert plain.splitlines()[-1] == "--- [1] " + alone.rstrip("\n")


def test_generate_sampling_is_seeded_and_dtype_selectable(ckpt, capsys):
    argv = ["generate", "--model", ckpt, "--prompt", "hi", "--max-new-tokens", "8", "--temperature", "1.0",
            "--top-p", "0.9", "--seed", "3"]
    _, a, _ = run_cli(argv, capsys)
    _, b, _ = run_cli(argv, capsys)
    assert a == b
    code, c, _ = run_cli(argv + ["--dtype", "bfloat16"], capsys)
    assert code == 0 and c.startswith("hi")


def test_generate_chat_wraps_the_prompt_in_the_template(ckpt, capsys):
    code, out, _ = run_cli(["generate", "--model", ckpt, "--prompt", "7*6?", "--chat", "--max-new-tokens", "6"],
                           capsys)
    engine = Engine.from_pretrained(ckpt)
    tok = engine.tokenizer
    ids = engine.generate([chat_prompt(tok, [{"role": "user", "content": "7*6?"}])[0]], 6)[0].tokens
    assert code == 0
    assert out == "<think>\n" + tok.decode(ids) + "\n"


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/ckpt"], "no tokenizer.json"),
    (["--max-new-tokens", "5000"], "exceed the context"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "1.5"], "top_p"),
    (["--device", "tpu"], "expected cpu, cuda or cuda:N"),
    *([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA device")]),
])
def test_generate_bad_input_is_one_clear_line(ckpt, capsys, argv, message):
    code, out, err = run_cli(["generate", "--model", ckpt, "--prompt", "x", *argv], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_chat_keeps_history_resets_and_exits(ckpt, capsys, monkeypatch):
    seen = []
    stream = Engine.stream

    def recording(self, prompts, *a, **kw):
        seen.append(prompts[0])
        yield from stream(self, prompts, *a, **kw)

    monkeypatch.setattr(Engine, "stream", recording)
    code, out, _ = run_cli(["chat", "--model", ckpt, "--max-new-tokens", "6"], capsys,
                           stdin="hello\nhow are you\n/reset\nhello\n/exit\nnever read\n", monkeypatch=monkeypatch)
    assert code == 0 and len(seen) == 3
    assert out.count("<think>") == 3 and "(history cleared)" in out
    tok = Tokenizer.from_pretrained(ckpt)
    first = chat_prompt(tok, [{"role": "user", "content": "hello"}])[0]
    assert seen[0] == first and seen[2] == first  # /reset forgot the first exchange
    # The second turn carries the first exchange: the template keeps the answer, drops reasoning.
    reply = Engine(Engine.from_pretrained(ckpt).model, tok).generate([first], 6)[0].tokens
    reasoning, answer = tok.split_reasoning(tok.decode(reply))
    history = [{"role": "user", "content": "hello"},
               {"role": "assistant", "content": answer, "reasoning_content": reasoning},
               {"role": "user", "content": "how are you"}]
    assert seen[1] == chat_prompt(tok, history)[0]


def test_chat_ends_on_end_of_input(ckpt, capsys, monkeypatch):
    code, out, _ = run_cli(["chat", "--model", ckpt, "--max-new-tokens", "4"], capsys, stdin="hi\n",
                           monkeypatch=monkeypatch)
    assert code == 0 and out.count(">>> ") == 2


def test_reply_printer_sets_reasoning_apart_even_when_split_across_chunks():
    out = io.StringIO()
    printer = ReplyPrinter(out, "</think>", color=True)
    printer.begin()
    for chunk in ["let me ", "think</th", "ink>", "\n\n42", "<｜end▁of▁sentence｜>"]:
        printer.feed(chunk)
    printer.end()
    dim, reset = "\x1b[2m", "\x1b[0m"
    text = out.getvalue()
    assert text.replace(dim, "").replace(reset, "") == "<think>\nlet me think</think>\n\n42<｜end▁of▁sentence｜>\n"
    answer_start = text.index("\n\n42")
    assert text.rindex(dim) < answer_start < text.index("42")  # the answer is not dimmed
    assert text.rindex(reset) <= answer_start




def test_generate_quantized_on_load_runs_and_stays_close(ckpt, capsys):
    base = ["generate", "--model", ckpt, "--prompt", "12+30=", "--max-new-tokens", "6"]
    code, plain, _ = run_cli(base, capsys)
    code8, int8, _ = run_cli(base + ["--quantize", "int8"], capsys)
    assert code == code8 == 0 and int8.startswith("12+30=") and len(int8) > len("12+30=")


def test_generate_int4_on_load_takes_the_group_size(ckpt, capsys, monkeypatch):
    import nanoseek.hf.io as io
    seen, load = [], io.load_pretrained
    monkeypatch.setattr(io, "load_pretrained", lambda *a, **kw: seen.append(kw["group_size"]) or load(*a, **kw))
    base = ["generate", "--model", ckpt, "--prompt", "12+30=", "--max-new-tokens", "4", "--quantize", "int4"]
    assert run_cli(base + ["--group-size", "32"], capsys)[0] == 0
    assert run_cli(base, capsys)[0] == 0
    assert seen == [32, 128]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generate_on_cuda_gives_the_cpu_greedy_tokens(ckpt, capsys):
    base = ["generate", "--model", ckpt, "--prompt", "12+30=", "--max-new-tokens", "12", "--dtype", "float32"]
    _, cpu, _ = run_cli(base, capsys)
    _, cuda, _ = run_cli(base + ["--device", "cuda"], capsys)
    assert cuda == cpu


def test_speculative_auto_drafts_only_with_an_mtp_module():
    import argparse

    from nanoseek.cli.flags import speculative_mode
    from nanoseek.config import ModelConfig
    from nanoseek.model import Transformer
    with_mtp = Engine(Transformer(ModelConfig.preset("tiny").replace(num_nextn_predict_layers=1)))
    without = Engine(Transformer(ModelConfig.preset("tiny").replace(num_nextn_predict_layers=0)))
    mode = lambda flag, engine: speculative_mode(argparse.Namespace(speculative=flag), engine)  # noqa: E731
    assert mode("auto", with_mtp) == "mtp" and mode("auto", without) is None
    assert mode("off", with_mtp) is None and mode("mtp", with_mtp) == "mtp"
