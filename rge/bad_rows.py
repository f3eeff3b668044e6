"""Rows that cannot be used, and ``errors.jsonl``, the file that lists them (``rge encode`` and ``rge train``)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .storage import atomic_write_text

ERROR_FILE = "errors.jsonl"


@dataclass(frozen=True, kw_only=True)
class BadRow:
    """A row that cannot be used: where it is, and why.

    A corpus row (``rge encode``) is placed by its ``position`` (0-based, blank lines skipped) and line, and
    names its ``id`` (None when it has none); a training row by its ``file`` and line, and by the ``step``
    when it failed in a training step.
    """

    line: int
    error: str
    position: int | None = None
    id: str | None = None
    file: str | None = None
    step: int | None = None

    def record(self) -> dict[str, Any]:
        """The row's object in ``errors.jsonl``: a corpus row's position, line, id and error; a training
        row's file, line, error, and step when there is one."""
        if self.position is not None:
            return {"position": self.position, "line": self.line, "id": self.id, "error": self.error}
        record = {"file": self.file, "line": self.line, "error": self.error}
        return record if self.step is None else {**record, "step": self.step}


def write_bad_rows(path: Path, rows: Iterable[BadRow], *, append: bool = False) -> None:
    """``rows`` as JSONL lines (``BadRow.record``): the file replaced whole (a crash leaves the old one or
    the new one), or the lines appended with ``append``."""
    text = "".join(json.dumps(row.record(), ensure_ascii=False) + "\n" for row in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if append:
        with path.open("a", encoding="utf-8") as handle:
            handle.write(text)
    else:
        atomic_write_text(path, text)


def read_bad_rows(path: Path) -> list[BadRow]:
    """The rows an ``errors.jsonl`` lists ([] when there is no such file)."""
    if not path.is_file():
        return []
    return [BadRow(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line]
