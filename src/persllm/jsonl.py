"""JSON Lines files: the way stages hand data to each other.

Appends are flushed and fsynced line by line so a killed process leaves at most one partial last line,
which ``read_jsonl`` skips; whole-file writes go through a temporary file and an atomic rename.
"""

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from persllm.errors import UserError
from persllm.layout import temporary_path


def iter_jsonl(path: Path, *, strict: bool = False) -> Iterator[dict[str, Any]]:
    """Yield the objects of a JSONL file.

    A broken *last* line is the trace of an interrupted append and is skipped; a broken line
    elsewhere (or any broken line when ``strict``) is a user error naming the file and line.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) and not strict:
                return
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg}); fix or delete that line") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{number}: expected a JSON object per line; fix that line")
        yield obj


def read_jsonl(path: Path, *, strict: bool = False) -> list[dict[str, Any]]:
    """All objects of a JSONL file; an absent file reads as empty."""
    if not path.exists():
        return []
    return list(iter_jsonl(path, strict=strict))


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Replace ``path`` atomically with ``rows``; returns the number written.

    The temporary file's name is this call's own, so two writers of one path never mix their lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    count = 0
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


class JsonlAppender:
    """Append-only writer that makes each line durable before returning.

    If the file ends in a partial line (an earlier run was killed mid-write) that fragment is
    cut off first, so the next record starts on a clean line.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_partial_last_line(path)
        self.path = path
        self._handle = path.open("a", encoding="utf-8")

    def append(self, row: dict[str, Any]) -> None:
        self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def extend(self, rows: list[dict[str, Any]]) -> None:
        """Append many rows, made durable together (one fsync)."""
        self._handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _truncate_partial_last_line(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    with path.open("r+b") as handle:
        handle.truncate(cut)
