"""Crash-safe file writes: nothing half-written ever sits under its final name.

    with atomic_directory("runs/sft") as tmp:   # build the whole folder in tmp ...
        save_file(tensors, tmp / "model.safetensors")
    # ... and only then does it replace runs/sft (files of the old folder that the new one
    # does not write, such as metrics.jsonl, are kept)

    atomic_write_text("out/metrics.json", json.dumps(d))
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _link_tree(src: Path, dst: Path, drop: tuple[str, ...]) -> None:
    """Hard-link (or copy, across filesystems) src's entries that dst lacks, except `drop` globs."""
    for entry in src.iterdir():
        target = dst / entry.name
        if target.exists() or any(entry.match(p) for p in drop):
            continue
        if entry.is_dir():
            shutil.copytree(entry, target, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextmanager
def atomic_directory(path: str | os.PathLike, keep_existing: bool = True, drop: tuple[str, ...] = ()):
    """Yield a temporary folder beside `path`; on success it becomes `path` in one rename.

    keep_existing: entries of an existing `path` that the new folder does not contain are
    carried over (hard links, so the old folder stays whole until the swap), except those
    matching a glob in `drop` (files the new folder supersedes, such as old shards).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            if keep_existing:
                _link_tree(path, tmp, drop)
            old = path.parent / f".{path.name}.old-{tag}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
