"""Tokenizer: round trips, special tokens, chat template and mask, transformers compatibility."""

import json

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanoseek.data.tasks import get_task
from nanoseek.tokenizer import (BOS, EOS, GENERATION_PROMPT, SPECIAL_TOKENS, THINK_END, THINK_START, USER,
                                Tokenizer, split_reasoning)

UNICODE = "naïve café — 日本語のテキスト 🙂🚀 Ünïcödé\tTabs\n\nand  double  spaces "
CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 30?"},
     {"role": "assistant", "content": "<answer>42</answer>", "reasoning_content": "12 + 30 = 42"}],
    [{"role": "system", "content": "You are terse."}, {"role": "system", "content": "Use <answer> tags."},
     {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello", "reasoning_content": "greet back"},
     {"role": "user", "content": "Using 3, 5, 8 make 40."},
     {"role": "assistant", "content": "<answer>5 * 8</answer>", "reasoning_content": "5 * 8 = 40\nok"}],
    [{"role": "user", "content": "no reasoning given"}, {"role": "assistant", "content": "fine"}],
    [{"role": "user", "content": "日本語 🙂?"}],
]


@pytest.fixture(scope="module")
def corpus():
    examples = get_task("mixed").examples("train", 300, seed=0)
    return [ex.text() for ex in examples] + [UNICODE, "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def tok(corpus):
    return Tokenizer.train(corpus, vocab_size=1024)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf(saved):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(saved)


def test_special_tokens_are_single_ids_in_fixed_order(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)  # ModelConfig.preset("tiny") uses 0 / 1
    assert tok.vocab_size <= 1024 and tok.vocab_size > 512
    for t in SPECIAL_TOKENS:
        assert tok.encode(f"a{t}b")[1:-1] == [tok.token_to_id(t)]


def test_round_trip_text_unicode_and_special_tokens(tok):
    for text in [UNICODE, "What is 347 + 589?", f"{BOS}{USER}x{THINK_START}\ny\n{THINK_END}\n\nz{EOS}", "", " "]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("hi", add_bos=True) == [tok.bos_id] + tok.encode("hi")
    assert tok.encode_batch(["hi", UNICODE], add_bos=True) == [tok.encode("hi", True), tok.encode(UNICODE, True)]


def test_skip_special_tokens_keeps_think_markers(tok):
    ids = tok.encode(f"{BOS}{THINK_START}r{THINK_END}a{EOS}")
    assert tok.decode(ids, skip_special_tokens=True) == f"{THINK_START}r{THINK_END}a"


def test_digits_are_single_tokens(tok):
    assert len(tok.encode("1234567")) == 7
    assert tok.decode(tok.encode(" 905")[:1]) == " 9"  # a leading space rides on the first digit


def test_training_is_deterministic(corpus):
    a = Tokenizer.train(corpus[:100], vocab_size=400)
    b = Tokenizer.train(corpus[:100], vocab_size=400)
    assert a._tok.to_str() == b._tok.to_str()


def test_task_examples_fit_the_tiny_context(tok):
    for ex in get_task("mixed").examples("test", 100):
        ids, _ = tok.encode_chat(ex.messages())
        assert len(ids) <= 256, ex.prompt


def test_chat_format(tok):
    text = tok.apply_chat_template(CONVERSATIONS[1])
    assert text == (f"{BOS}You are terse.\n\nUse <answer> tags.{USER}hi<｜Assistant｜>hello{EOS}"
                    f"{USER}Using 3, 5, 8 make 40.<｜Assistant｜>{THINK_START}\n5 * 8 = 40\nok\n{THINK_END}\n\n"
                    f"<answer>5 * 8</answer>{EOS}")
    prompt = tok.apply_chat_template(CONVERSATIONS[0][:1], add_generation_prompt=True)
    assert prompt == f"{BOS}{USER}What is 12 + 30?<｜Assistant｜><think>\n"
    assert prompt.endswith(GENERATION_PROMPT)


def test_chat_mask_covers_exactly_the_assistant_tokens(tok):
    ids, mask = tok.encode_chat(CONVERSATIONS[1])
    assert ids == tok.encode(tok.apply_chat_template(CONVERSATIONS[1]))
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs.append(cur)
    assert [tok.decode(r) for r in runs] == [f"hello{EOS}", f"5 * 8 = 40\nok\n{THINK_END}\n\n<answer>5 * 8</answer>{EOS}"]
    first = mask.index(1)
    assert tok.decode(ids[:first]).endswith("hi<｜Assistant｜>")
    last_start = len(mask) - len(runs[-1])
    assert tok.decode(ids[:last_start]).endswith(GENERATION_PROMPT)
    # The trained part decodes back to the message's reasoning and content.
    assert split_reasoning(tok.decode(runs[-1])) == ("5 * 8 = 40\nok", "<answer>5 * 8</answer>")
    ids, mask = tok.encode_chat(CONVERSATIONS[0][:1], add_generation_prompt=True)
    assert sum(mask) == 0 and tok.decode(ids).endswith(GENERATION_PROMPT)


def test_bad_messages_raise(tok):
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="content"):
        tok.encode_chat([{"role": "user", "content": None}])
    with pytest.raises(ValueError, match="non-empty"):
        tok.apply_chat_template([])


def test_split_reasoning():
    assert split_reasoning("step 1\nstep 2\n</think>\n\n<answer>3</answer>") == ("step 1\nstep 2", "<answer>3</answer>")
    assert split_reasoning("still thinking") == ("still thinking", "")
    assert split_reasoning("<think>\nr\n</think>\n\na") == ("r", "a")
    assert split_reasoning(f"r</think>a{EOS}") == ("r", "a")
    assert split_reasoning("</think>just the answer") == ("", "just the answer")
    assert Tokenizer(RawTokenizer(models.BPE())).split_reasoning(f"r</think>a{EOS}") == ("r", "a")


def test_save_pretrained_files(tok, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (BOS, EOS, "<｜▁pad▁｜>")
    assert config["chat_template"] == tok.chat_template
    for loaded in (Tokenizer.from_pretrained(saved), Tokenizer.from_pretrained(saved / "tokenizer.json")):
        assert loaded.encode(UNICODE) == tok.encode(UNICODE)
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_autotokenizer_gives_identical_ids(tok, hf):
    for text in [UNICODE, "What is 347 + 589?", f"{BOS}x{THINK_START}y{THINK_END}{EOS}"]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf(text)["input_ids"] == tok.encode(text, add_bos=True)
        ids = tok.encode(text)
        assert hf.decode(ids) == tok.decode(ids)
    assert len(hf) == tok.vocab_size
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_autotokenizer_renders_the_same_chat(tok, hf):
    for conv in CONVERSATIONS:
        for gen in (False, True):
            if gen and conv[-1]["role"] == "assistant":
                continue
            assert hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen) == \
                tok.apply_chat_template(conv, add_generation_prompt=gen)
        if conv[-1]["role"] == "assistant":  # transformers' {% generation %} mask agrees with ours
            out = hf.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            assert (list(out["input_ids"]), list(out["assistant_masks"])) == tok.encode_chat(conv)


def _bare_tokenizer_json(path):
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    raw.save(str(path))


def test_bare_tokenizer_json_without_chat_tokens(tmp_path):
    _bare_tokenizer_json(tmp_path / "tokenizer.json")
    tok = Tokenizer.from_pretrained(tmp_path / "tokenizer.json")
    assert tok.bos_id is None and tok.eos_id is None and tok.pad_id is None
    conv = CONVERSATIONS[0]
    ids, mask = tok.encode_chat(conv)
    assert tok.decode(ids) == tok.apply_chat_template(conv)  # markers are plain text
    assert tok.decode([i for i, m in zip(ids, mask) if m]).endswith(f"<answer>42</answer>{EOS}")
    with pytest.raises(ValueError, match="BOS"):
        tok.encode("x", add_bos=True)


def test_deepseek_style_config(tok, tmp_path):
    # DeepSeek's tokenizer_config.json stores tokens as AddedToken dicts and names a Llama class.
    (tmp_path / "tokenizer.json").write_text(tok._tok.to_str(), encoding="utf-8")
    added = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizerFast", "add_bos_token": True, "pad_token": None,
        "bos_token": {**added, "content": BOS}, "eos_token": {**added, "content": EOS}}), encoding="utf-8")
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (0, 1, 2)
    assert loaded.apply_chat_template(CONVERSATIONS[0]) == tok.apply_chat_template(CONVERSATIONS[0])


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["x"], vocab_size=100)


def test_checkpoint_own_chat_template_is_used(tmp_path, tok):
    trained = tok
    trained.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}[assistant]{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == "[user]hi[assistant]"
    tok.save_pretrained(tmp_path / "again")  # the checkpoint's template travels with it
    assert Tokenizer.from_pretrained(tmp_path / "again").apply_chat_template(msgs) == "[user]hi"
    # our own template loads back as the built-in rendering
    trained.save_pretrained(tmp_path / "ours")
    assert Tokenizer.from_pretrained(tmp_path / "ours").own_template is None


def test_checkpoint_template_cannot_escape_the_sandbox(tmp_path, tok):
    trained = tok
    trained.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(Exception):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])
