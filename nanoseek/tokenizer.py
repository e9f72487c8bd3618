"""Byte-level BPE tokenizer with DeepSeek-R1's special tokens and chat format.

A thin layer over the `tokenizers` library: ``Tokenizer.train`` learns a small byte-level BPE for
the tiny models, ``Tokenizer.from_pretrained`` loads any tokenizer.json (DeepSeek's included), and
``save_pretrained`` writes tokenizer.json + tokenizer_config.json that
``transformers.AutoTokenizer`` loads with the same ids and the same chat rendering.

    tok = Tokenizer.train(texts, vocab_size=1024)
    ids, mask = tok.encode_chat([{"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": "4", "reasoning_content": "2+2=4"}])
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    # prompt ends with GENERATION_PROMPT = "<｜Assistant｜><think>\\n"

Chat format (DeepSeek-R1's, with the template opening <think> as R1's current one does):

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}
        <｜Assistant｜><think>\\n{reasoning}\\n</think>\\n\\n{content}<｜end▁of▁sentence｜>  (one line)

Several system messages are joined with a blank line and placed first. Reasoning is kept only for
assistant turns after the last user message (the turns being trained or generated); earlier
assistant turns are rendered ``<｜Assistant｜>{content}<｜end▁of▁sentence｜>`` with their
reasoning dropped, as R1's template does for conversation history.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _HFTokenizer

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_END = "<｜fim▁end｜>"

# Order fixes the ids of a trained tokenizer: BOS=0 and EOS=1 match ModelConfig.preset("tiny").
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, THINK_START, THINK_END, FIM_BEGIN, FIM_HOLE, FIM_END]
# <think> and </think> are single tokens but not "special": decode(skip_special_tokens=True) must
# keep them so the reasoning can still be split from the answer (R1's tokenizer does the same).
NON_SPECIAL = {THINK_START, THINK_END}

# What the model sees before it starts writing; generation continues inside the open <think>.
GENERATION_PROMPT = ASSISTANT + THINK_START + "\n"
ROLES = ("system", "user", "assistant")

# Jinja version of _chat_segments, for transformers. __BOS__/__EOS__ are replaced by the token
# strings when saved, so the template does not depend on which variables a renderer passes in.
# The {% generation %} blocks let transformers' return_assistant_tokens_mask find the same
# assistant tokens as encode_chat.
_JINJA_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{{- __BOS__ + (messages | selectattr('role', 'equalto', 'system') | map(attribute='content')"
    " | join('\\n\\n')) -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- '" + USER + "' + m['content'] -}}"
    "{%- elif m['role'] == 'assistant' and loop.index0 > ns.last_user -%}"
    "{{- '" + GENERATION_PROMPT.replace("\n", "\\n") + "' -}}"
    "{%- generation -%}{{- (m.get('reasoning_content') or '') + '\\n" + THINK_END + "\\n\\n'"
    " + m['content'] + __EOS__ -}}{%- endgeneration -%}"
    "{%- elif m['role'] == 'assistant' -%}{{- '" + ASSISTANT + "' -}}"
    "{%- generation -%}{{- m['content'] + __EOS__ -}}{%- endgeneration -%}"
    "{%- elif m['role'] != 'system' -%}{{- raise_exception('unsupported role: ' + m['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + GENERATION_PROMPT.replace("\n", "\\n") + "' -}}{%- endif -%}"
)


def _jinja_literal(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _check_messages(messages: Sequence[dict], roles: tuple = ROLES, optional_content: bool = False) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        if m.get("role") not in roles:
            raise ValueError(f"messages[{i}]['role'] = {m.get('role')!r}: must be one of {roles}")
        if not isinstance(m.get("content"), str) and not (optional_content and m.get("content") is None):
            raise ValueError(f"messages[{i}]['content'] must be a str, got {type(m.get('content')).__name__}")
        if not isinstance(m.get("reasoning_content") or "", str):
            raise ValueError(f"messages[{i}]['reasoning_content'] must be a str or None")


def chat_segments(messages: Sequence[dict], add_generation_prompt: bool = False, bos: str = BOS,
                  eos: str = EOS) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, written_by_assistant) pieces; their concatenation is the
    chat template's output. The single source of truth for apply_chat_template and encode_chat."""
    _check_messages(messages)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    segs = [(bos + system, False)]
    for i, m in enumerate(messages):
        if m["role"] == "user":
            segs.append((USER + m["content"], False))
        elif m["role"] == "assistant" and i > last_user:
            reasoning = m.get("reasoning_content") or ""
            segs.append((GENERATION_PROMPT, False))
            segs.append((reasoning + "\n" + THINK_END + "\n\n" + m["content"] + eos, True))
        elif m["role"] == "assistant":  # history: reasoning dropped
            segs.append((ASSISTANT, False))
            segs.append((m["content"] + eos, True))
    if add_generation_prompt:
        segs.append((GENERATION_PROMPT, False))
    return segs


def split_reasoning(text: str, eos: str = EOS) -> tuple[str, str]:
    """Split a completion generated after the prompt's open <think> into (reasoning, content).

    Tolerates a completion that opens <think> itself, and a missing </think> (then everything is
    reasoning and content is ""). A trailing end-of-sentence marker is removed; both parts are
    stripped of surrounding whitespace.
    """
    text = text.strip()
    if text.startswith(THINK_START):
        text = text[len(THINK_START):]
    if text.endswith(eos):
        text = text[: -len(eos)]
    reasoning, sep, content = text.partition(THINK_END)
    return reasoning.strip(), content.strip() if sep else ""


def _token_content(value) -> str | None:
    """tokenizer_config.json stores a token as a str or as {"content": str, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _render_jinja(template: str, messages, add_generation_prompt: bool, bos: str, eos: str, **extra) -> str:
    """A checkpoint's chat template, rendered in Jinja's sandbox (templates are data, not code);
    `extra` are further template variables (tools, chat_template_kwargs)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise TemplateError(message)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(**extra, messages=list(messages), bos_token=bos, eos_token=eos,
                                                add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise ValueError(f"the checkpoint's chat_template failed: {e}") from None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the DeepSeek-R1 chat format.

    bos_id / eos_id are None when a loaded tokenizer lacks those tokens (then the chat markers
    are encoded as plain text); pad_id falls back to eos_id.
    """

    def __init__(self, tok: _HFTokenizer, bos_token: str = BOS, eos_token: str = EOS,
                 pad_token: str | None = PAD, own_template: str | None = None):
        self._tok = tok
        self._plain: _HFTokenizer | None = None  # made by encode_text
        # A checkpoint's own Jinja chat template (e.g. DeepSeek-R1's), used by apply_chat_template
        # instead of the built-in R1-style rendering; None for ours.
        self.own_template = own_template
        self.bos_token, self.eos_token = bos_token, eos_token
        has_pad = pad_token is not None and tok.token_to_id(pad_token) is not None
        self.pad_token = pad_token if has_pad else eos_token
        self.user_token, self.assistant_token = USER, ASSISTANT
        self.think_start, self.think_end = THINK_START, THINK_END
        self.generation_prompt = GENERATION_PROMPT

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1024) -> "Tokenizer":
        """Byte-level BPE learned from `texts`; `vocab_size` counts the special tokens. Deterministic."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size={vocab_size}: must be at least {256 + len(SPECIAL_TOKENS)} "
                             "(256 bytes + special tokens)")
        tok = _HFTokenizer(models.BPE())
        # Every digit is its own token (only the first may carry a leading space, like a word), so
        # column arithmetic is visible digit by digit to a small model, as in LLaMA's tokenizer.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r" ?\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer)
        # transformers' default add_special_tokens=True then prepends BOS like encode(add_bos=True).
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, tok.token_to_id(BOS))])
        spec = json.loads(tok.to_str())
        for added in spec["added_tokens"]:
            added["special"] = added["content"] not in NON_SPECIAL
        return cls(_HFTokenizer.from_str(json.dumps(spec)))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a directory holding tokenizer.json (+ optional tokenizer_config.json), or a
        tokenizer.json file. bos/eos/pad come from the config, else DeepSeek's token names."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        try:
            tok = _HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust error says what is wrong but not where
            raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from None
        config_file = file.with_name("tokenizer_config.json")
        config = {}
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_file}: invalid JSON ({e})") from None
        loaded = cls(tok, bos_token=_token_content(config.get("bos_token")) or BOS,
                     eos_token=_token_content(config.get("eos_token")) or EOS,
                     pad_token=_token_content(config.get("pad_token")) or PAD)
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str) and template != loaded.chat_template:
            loaded.own_template = template
        return loaded

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the chat template), each atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "chat_template": self.own_template or self.chat_template}
        # Tokens missing from the vocabulary are left out: transformers would add them as new ids.
        for key in ("bos_token", "eos_token", "pad_token"):
            if self.token_to_id(getattr(self, key)) is not None:
                config[key] = getattr(self, key)
        _write_atomic(path / "tokenizer.json", self._tok.to_str())
        _write_atomic(path / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # -- vocabulary -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self._tok.id_to_token(id)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    @property
    def has_fim(self) -> bool:
        """Whether DeepSeek-Coder's fill-in-the-middle sentinels are single tokens here (Coder's and
        nanoseek's tokenizers: yes; R1-Distill's: no, so a FIM prompt would be plain text)."""
        return all(self.token_to_id(t) is not None for t in (FIM_BEGIN, FIM_HOLE, FIM_END))

    # -- text -------------------------------------------------------------------------------

    def _bos(self, add_bos: bool) -> list[int]:
        if add_bos and self.bos_id is None:
            raise ValueError(f"add_bos=True but the tokenizer has no BOS token {self.bos_token!r}")
        return [self.bos_id] if add_bos else []

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it become their single ids."""
        return self._bos(add_bos) + self._tok.encode(text, add_special_tokens=False).ids

    def to_json(self) -> str:
        """The tokenizer.json text (for libraries that read a vocabulary, e.g. a grammar engine)."""
        return self._tok.to_str()

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text` read as plain text: a special token's string in it (a user typing
        "<｜Assistant｜>") is encoded as its characters, never as the special id."""
        if self._plain is None:  # a copy that splits special tokens; the shared one is never toggled
            plain = _HFTokenizer.from_str(self._tok.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """encode() over many texts, in parallel in the Rust library."""
        bos = self._bos(add_bos)
        return [bos + e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- chat -------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str:
        """The Jinja chat template written to tokenizer_config.json (same output as apply_chat_template)."""
        return (_JINJA_TEMPLATE.replace("__BOS__", _jinja_literal(self.bos_token))
                .replace("__EOS__", _jinja_literal(self.eos_token)))

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                            **template_kwargs) -> str:
        """Render a conversation as text: the checkpoint's own template when it has one (which
        also sees `template_kwargs`: tools, enable_thinking..., and may take role "tool"), else
        the built-in DeepSeek-R1 format (see the module docstring), which ignores them."""
        if self.own_template is not None:
            _check_messages(messages, ROLES + ("tool",), optional_content=True)
            return _render_jinja(self.own_template, messages, add_generation_prompt,
                                 self.bos_token, self.eos_token, **template_kwargs)
        segments = chat_segments(messages, add_generation_prompt, self.bos_token, self.eos_token)
        return "".join(text for text, _ in segments)

    def encode_chat(self, messages: Sequence[dict],
                    add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of the rendered conversation and a mask that is 1 on exactly the tokens the
        assistant wrote (reasoning, </think>, answer, closing EOS), 0 on everything the template adds.

        Each piece is tokenized on its own, so no token straddles the prompt/answer boundary: the
        ids match what the model sees when it generates after the generation prompt.
        """
        ids, mask = [], []
        for text, written in chat_segments(messages, add_generation_prompt, self.bos_token, self.eos_token):
            piece = self._tok.encode(text, add_special_tokens=False).ids
            ids += piece
            mask += [int(written)] * len(piece)
        return ids, mask

    def split_reasoning(self, text: str) -> tuple[str, str]:
        """split_reasoning() with this tokenizer's end-of-sentence marker."""
        return split_reasoning(text, self.eos_token)
