"""Prompt datasets: a built-in task or your own records, as one list of Examples for GRPO,
distillation, evaluation and SFT.

    train = load_examples("arithmetic:max_digits=2", split="train", n=5000)    # a built-in task
    train = load_examples("problems.jsonl", prompt_column="question", answer_column="solution")
    train, held_out = train_and_held_out("data/gsm8k", "train", None, "test", eval_size=100)
    columns = reward_columns(train[:4])        # {"answer": [...], "example": [...], "level": [...], ...}

A spec is a built-in task name (nanoseek.data.tasks, with settings after a colon) or a path:
  .jsonl / .json   one JSON object per line (read directly);
  .parquet         one row per record (pyarrow);
  a folder written by `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` (load_from_disk),
  any other folder or file: `datasets.load_dataset` on the local files (csv, json, parquet...), never
  a network fetch: a spec that is not an existing path or a built-in task is an error.
`split` picks a split of a DatasetDict or of load_dataset; a single file has just its records.

The prompt column holds a string (asked as one user turn) or a list of chat messages (the
conversation up to the generation prompt); the answer column the reference answer (optional for
rewards that do not need one). Every column of the record travels with the Example (meta["columns"]),
so reward functions receive them by name, as TRL's do.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .prompts import task_from_spec
from .tasks import TASKS, Example

HF_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")


def is_builtin(spec: str) -> bool:
    return spec.partition(":")[0] in TASKS and not Path(spec).exists()


def load_rows(spec: str, split: str = "train") -> list[dict]:
    """The records of a local dataset (see the module docstring) as dicts."""
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"dataset {spec!r}: neither a built-in task ({', '.join(TASKS)}) nor an existing "
                                "path (datasets are read from local files only)")
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if path.is_file() and path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    import datasets  # only for folders and other formats

    if path.is_dir() and any((path / m).exists() for m in HF_MARKERS):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"dataset {spec!r} has splits {sorted(ds)}, not {split!r}")
            ds = ds[split]
        return ds.to_list()
    try:
        return datasets.load_dataset(str(path), split=split).to_list()
    except ValueError as e:  # an unknown split names the ones there are
        raise ValueError(f"dataset {spec!r}, split {split!r}: {e}") from None


def _read_jsonl(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
    return rows


def row_example(row: dict, prompt_column: str, answer_column: str | None, where: str) -> Example:
    """One record as an Example: the prompt (text or messages), the answer, every column in meta."""
    if prompt_column not in row:
        raise ValueError(f"{where}: no prompt column {prompt_column!r}; columns are {sorted(row)} "
                         "(pick one with --prompt-column)")
    prompt, meta = row[prompt_column], {"columns": row}
    if isinstance(prompt, list):  # chat messages: asked as they are, up to the generation prompt
        meta["prompt_messages"] = prompt[:-1] if prompt and prompt[-1].get("role") == "assistant" else prompt
        prompt = next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")
    elif not isinstance(prompt, str):
        raise ValueError(f"{where}: prompt column {prompt_column!r} holds a {type(prompt).__name__}, "
                         "expected text or a list of messages")
    answer = row.get(answer_column) if answer_column else None
    return Example(prompt, "", None if answer is None else str(answer), meta)


def load_examples(spec: str, split: str = "train", prompt_column: str = "prompt", answer_column: str | None = "answer",
                  n: int | None = None, seed: int = 0) -> list[Example]:
    """`n` (default: all; built-in tasks need n) examples of `split` from a built-in task or a dataset."""
    if is_builtin(spec):
        return task_from_spec(spec).examples(split, n or 1000, seed=seed)
    rows = load_rows(spec, split)
    if not rows:
        raise ValueError(f"dataset {spec!r} (split {split!r}) is empty")
    out = [row_example(r, prompt_column, answer_column, f"{spec} record {i}") for i, r in enumerate(rows)]
    return out[:n] if n else out


def train_and_held_out(spec: str, split: str, eval_spec: str | None, eval_split: str, eval_size: int,
                       prompt_column: str = "prompt", answer_column: str | None = "answer", n: int | None = None,
                       seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Training examples and held-out ones: from `eval_spec` (default: the same dataset) at `eval_split`;
    a dataset without that split gives its last `eval_size` records (shuffled with `seed`) and trains on
    the rest, which is said on stdout."""
    kw = dict(prompt_column=prompt_column, answer_column=answer_column)
    if is_builtin(spec) and eval_spec is None:
        task = task_from_spec(spec)
        return task.examples(split, n or 1000, seed=seed), task.examples(eval_split, eval_size, seed=seed)
    train = load_examples(spec, split, **kw)
    if eval_spec is not None:
        held = load_examples(eval_spec, eval_split, n=eval_size, seed=seed, **kw)
    else:
        try:  # a file has no splits; a folder may lack this one
            if Path(spec).is_file() or eval_split == split:
                raise ValueError(f"{spec} has no separate {eval_split!r} split")
            held = load_examples(spec, eval_split, n=eval_size, seed=seed, **kw)
        except ValueError:
            if len(train) <= eval_size:
                raise ValueError(f"dataset {spec!r}: {len(train)} records, too few to hold out {eval_size} "
                                 "(give --eval-dataset or a smaller --eval-size)") from None
            train = train[:]
            random.Random(seed).shuffle(train)
            held, train = train[-eval_size:], train[:-eval_size]
            print(f"data: {spec} has no {eval_split!r} split; holding out {eval_size} of its records")
    return (train[:n] if n else train), held[:eval_size]


def reward_columns(examples: list[Example]) -> dict[str, list]:
    """The columns reward functions receive, one list entry per example: every dataset column (for a
    built-in task, its meta), plus "answer" (the reference) and "example" (the Example itself)."""
    names: dict[str, None] = {}
    for ex in examples:
        names.update(dict.fromkeys(_columns(ex)))
    out = {name: [_columns(ex).get(name) for ex in examples] for name in names}
    out["answer"] = [ex.answer for ex in examples]
    out["example"] = list(examples)
    return out


def _columns(ex: Example) -> dict:
    meta = ex.meta or {}
    return meta["columns"] if "columns" in meta else {k: v for k, v in meta.items()}
