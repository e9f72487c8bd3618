"""Read training documents from files, or generate them from a built-in task.

    docs = load_documents(["corpus.txt", "chats.jsonl", "more.parquet"])
    docs = load_data("countdown", n=2000)           # built-in task: plain-text documents
    docs = load_data("countdown", n=2000, chat=True)  # ... or conversations, for SFT

A document is either a str (plain text) or a conversation: a list of message dicts with role
(system/user/assistant), content and optional reasoning_content (see nanoseek.tokenizer).

Formats, chosen by file extension:
  .txt / .md   the whole file is one document (a long file is split into rows later by the
               packer, which counts it); an empty file is an error.
  .jsonl       one JSON object per line with a "text" string or a "messages" list; blank lines
               are skipped.
  .parquet     a "text" or "messages" column (read with pyarrow); a row may use either.
  a `datasets` save_to_disk folder: its "train" split, rows as above.
A record with "prompt" and "completion" (TRL's format: strings, or message lists) is a conversation:
the user asks the prompt, the assistant answers the completion (<think>...</think> as its reasoning).
A directory stands for the supported files in it, in sorted order. Errors name the file and the
line (JSONL) or row (Parquet).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from nanoseek.data.tasks import TASKS, get_task
from nanoseek.tokenizer import THINK_END, THINK_START

Document = str | list[dict]
TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
ROLES = ("system", "user", "assistant")


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: messages[{i}] must be an object, got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise ValueError(f"{where}: messages[{i}] has role {m.get('role')!r}, expected one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: messages[{i}] needs a string 'content'")
        if not isinstance(m.get("reasoning_content") or "", str):
            raise ValueError(f"{where}: messages[{i}] 'reasoning_content' must be a string")
    # Parquet structs carry every field of the schema, so absent fields arrive as None: drop them.
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _prompt_completion(row: dict, where: str) -> list[dict]:
    """A prompt/completion record (TRL's format) as a conversation: text fields become a user and an
    assistant turn, message lists are joined; a completion's <think>...</think> becomes its reasoning."""
    prompt, completion = row["prompt"], row["completion"]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if isinstance(completion, str):
        reasoning, sep, answer = completion.partition(THINK_END)
        completion = [{"role": "assistant", "content": answer.strip(),
                       "reasoning_content": reasoning.replace(THINK_START, "").strip()} if sep
                      else {"role": "assistant", "content": completion}]
    return _check_messages(list(prompt) + list(completion), where)


def _record(row: dict, where: str) -> Document:
    """A document from one JSONL object or Parquet row: its "text", else its "messages", else its
    "prompt" and "completion"."""
    if row.get("text") is None and row.get("messages") is None and "prompt" in row and "completion" in row:
        return _prompt_completion(row, where)
    text, messages = row.get("text"), row.get("messages")
    if text is not None:
        if not isinstance(text, str):
            raise ValueError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{where}: 'text' is empty")
        return text
    if messages is not None:
        return _check_messages(messages, where)
    raise ValueError(f"{where}: has neither a 'text', a 'messages' nor 'prompt' and 'completion' fields")


def _load_text(path: Path) -> list[Document]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise ValueError(f"{path}: empty file")
    return [text]


def _load_jsonl(path: Path) -> list[Document]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            docs.append(_record(row, where))
    if not docs:
        raise ValueError(f"{path}: empty file (no JSON lines)")
    return docs


def _load_parquet(path: Path) -> list[Document]:
    import pyarrow.parquet as pq  # imported here: only Parquet users pay for it

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt or non-Parquet file
        raise ValueError(f"{path}: cannot read as Parquet ({e})") from None
    columns = [c for c in ("text", "messages", "prompt", "completion") if c in table.column_names]
    if not columns:
        raise ValueError(f"{path}: needs a 'text', 'messages' or 'prompt'+'completion' column, has {table.column_names}")
    if table.num_rows == 0:
        raise ValueError(f"{path}: empty file (no rows)")
    rows = table.select(columns).to_pylist()
    return [_record(row, f"{path}: row {i}") for i, row in enumerate(rows)]


def _expand(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for p in map(Path, paths):
        if p.is_dir() and any((p / m).exists() for m in ("dataset_dict.json", "dataset_info.json", "state.json")):
            files.append(p)  # a `datasets` save_to_disk folder
        elif p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in SUFFIXES and f.is_file())
            if not found:
                raise ValueError(f"{p}: directory has no {'/'.join(SUFFIXES)} files")
            files += found
        elif not p.exists():
            raise FileNotFoundError(f"no such file: {p}")
        else:
            files.append(p)
    return files


def load_documents(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Document]:
    """All documents in `paths` (files or directories), in order. See the module docstring."""
    docs: list[Document] = []
    for path in _expand(paths):
        suffix = path.suffix.lower()
        if path.is_dir():
            from .records import load_rows
            docs += [_record(row, f"{path}: row {i}") for i, row in enumerate(load_rows(str(path), "train"))]
        elif suffix in TEXT_SUFFIXES:
            docs += _load_text(path)
        elif suffix == ".jsonl":
            docs += _load_jsonl(path)
        elif suffix == ".parquet":
            docs += _load_parquet(path)
        else:
            raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    return docs


def load_data(spec: str | os.PathLike | Sequence[str | os.PathLike], n: int = 1000, split: str = "train",
              seed: int = 0, chat: bool = False, direct_fraction: float = 0.0) -> list[Document]:
    """Documents from a built-in task name (n generated examples of `split`, as plain text, or as
    conversations when chat=True) or from file paths (what the files hold; n, split, seed, chat and
    direct_fraction do not apply). A comma-separated string is a list of paths.

    direct_fraction (plain-text task documents only): this share of the documents, drawn with the
    seed, states the result directly (Example.text(direct=True): the worked steps left out), the rest
    keep the worked solution. A base pretrained on such a mix mostly answers in one line, short and
    often wrong on hard problems, but can write the worked form: an R1-Zero base with longer, more
    accurate reasoning to discover by RL."""
    if not 0.0 <= direct_fraction <= 1.0:
        raise ValueError(f"direct_fraction={direct_fraction}: must be in [0, 1]")
    if isinstance(spec, str) and spec in TASKS:
        examples = get_task(spec).examples(split, n, seed)
        if chat and direct_fraction:
            raise ValueError("direct_fraction applies to plain-text documents, not to chat=True")
        if chat:
            return [ex.messages() for ex in examples]
        rng = random.Random(f"direct/{split}/{seed}")
        return [ex.text(direct=rng.random() < direct_fraction) for ex in examples]
    if direct_fraction:
        raise ValueError("direct_fraction applies to built-in tasks only, not to files")
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
        missing = [s for s in spec if not Path(s).exists()]
        if missing:
            raise ValueError(f"{missing[0]!r} is neither a built-in task ({', '.join(TASKS)}) "
                             "nor an existing path")
    return load_documents(spec)
