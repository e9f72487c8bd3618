"""Loaders: text, JSONL and Parquet documents; clear errors that name the file and line."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanoseek.data.loaders import load_data, load_documents

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "reasoning_content": "r"}]


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_text_file_is_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("first para\n\nsecond para 日本\n", encoding="utf-8")
    assert load_documents(tmp_path / "a.txt") == ["first para\n\nsecond para 日本\n"]


def test_jsonl_text_and_messages(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "doc one"}, "", {"messages": CHAT}, {"text": "doc two", "id": 3}])
    assert load_documents([path]) == ["doc one", CHAT, "doc two"]


def test_parquet_text_and_messages(tmp_path):
    pq.write_table(pa.table({"text": ["a", None], "messages": [None, CHAT[:1]]}), tmp_path / "d.parquet")
    assert load_documents(tmp_path / "d.parquet") == ["a", CHAT[:1]]
    pq.write_table(pa.table({"messages": [CHAT]}), tmp_path / "m.parquet")
    assert load_documents(str(tmp_path / "m.parquet")) == [CHAT]  # absent struct fields dropped


def test_directory_and_mixed_formats(tmp_path):
    (tmp_path / "b.txt").write_text("text doc")
    _jsonl(tmp_path / "a.jsonl", [{"text": "json doc"}])
    (tmp_path / "notes.csv").write_text("ignored in a directory")
    assert load_documents(tmp_path) == ["json doc", "text doc"]


@pytest.mark.parametrize("name,content,match", [
    ("empty.txt", "", "empty.txt: empty file"),
    ("blank.txt", " \n\n", "blank.txt: empty file"),
    ("empty.jsonl", "\n\n", "empty.jsonl: empty file"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n', r"bad.jsonl:3: malformed JSON"),
    ("neither.jsonl", '{"text": "ok"}\n{"body": "x"}\n', r"neither.jsonl:2: has neither a 'text', a 'messages' nor 'prompt'"),
    ("list.jsonl", '["text"]\n', r"list.jsonl:1: expected a JSON object"),
    ("role.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}\n', r"role.jsonl:1: messages\[0\] has role 'robot'"),
    ("content.jsonl", '{"messages": [{"role": "user"}]}\n', r"content.jsonl:1: messages\[0\] needs a string 'content'"),
    ("type.jsonl", '{"text": 5}\n', r"type.jsonl:1: 'text' must be a string"),
    ("data.csv", "a,b\n", r"data.csv: unsupported file type '.csv'"),
])
def test_bad_data_errors_name_file_and_line(tmp_path, name, content, match):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_documents(tmp_path / name)


def test_bad_parquet_errors(tmp_path):
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "hole.parquet")
    with pytest.raises(ValueError, match=r"hole.parquet: row 1: has neither"):
        load_documents(tmp_path / "hole.parquet")
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "cols.parquet")
    with pytest.raises(ValueError, match=r"cols.parquet: needs a 'text', 'messages' or 'prompt'\+'completion' column"):
        load_documents(tmp_path / "cols.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "none.parquet")
    with pytest.raises(ValueError, match=r"none.parquet: empty file"):
        load_documents(tmp_path / "none.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"junk.parquet: cannot read as Parquet"):
        load_documents(tmp_path / "junk.parquet")


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_documents(tmp_path / "nope.txt")


def test_load_data_task_or_paths(tmp_path):
    texts = load_data("arithmetic", n=5, seed=1)
    assert len(texts) == 5 and all(isinstance(t, str) and "<answer>" in t for t in texts)
    chats = load_data("countdown", n=3, split="test", chat=True)
    assert [m["role"] for m in chats[0]] == ["user", "assistant"]
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "b.txt").write_text("B")
    assert load_data(f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}") == ["A", "B"]
    assert load_data([tmp_path / "b.txt"]) == ["B"]
    with pytest.raises(ValueError, match="neither a built-in task"):
        load_data("arithmetik")


def test_direct_fraction_mixes_one_line_answers_into_a_task_corpus(tmp_path):
    from nanoseek.data import get_task
    examples = get_task("arithmetic").examples("train", 400, seed=2)
    worked = load_data("arithmetic", n=400, seed=2)
    assert worked == [ex.text() for ex in examples]
    mixed = load_data("arithmetic", n=400, seed=2, direct_fraction=0.75)
    direct = [m == ex.text(direct=True) for m, ex in zip(mixed, examples)]
    assert all(d or m == ex.text() for d, m, ex in zip(direct, mixed, examples))
    assert 0.68 < sum(direct) / len(direct) < 0.82  # a seeded draw per document
    assert mixed == load_data("arithmetic", n=400, seed=2, direct_fraction=0.75)  # deterministic
    assert all(m == ex.text(direct=True) for m, ex in zip(load_data("arithmetic", n=400, seed=2, direct_fraction=1.0),
                                                          examples))
    (tmp_path / "a.txt").write_text("A")
    for bad in (dict(spec="arithmetic", direct_fraction=1.5), dict(spec="arithmetic", direct_fraction=0.5, chat=True),
                dict(spec=str(tmp_path / "a.txt"), direct_fraction=0.5)):
        with pytest.raises(ValueError, match="direct_fraction"):
            load_data(**bad)
