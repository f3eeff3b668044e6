"""Supervision rationales for MMEB-train rows, from one file per subset, as the authors keep them.

The authors' training reads ``FOLDER/<Subset>.json`` with ``datasets``' json loader (JSON Lines or one JSON
array): the subset's rows, each with a ``rationale`` field added. rge joins such a file to a snapshot's rows
by what identifies a row there: its ``qry`` and ``qry_image_path`` and, when the record has one, its
``pos_text`` (the values as the snapshot stores them, before any rewriting). A record may hold just those
fields and ``rationale``. ``datasets`` reads each file once into its cache (memory-mapped Arrow); rge keeps
an 8-byte hash of each record's key in memory, and reads a rationale when its row comes up.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import TrainingDataError, require_extra

RATIONALE_SUFFIXES = (".json", ".jsonl")
KEY_FIELDS = ("qry", "qry_image_path")
POSITIVE_FIELD = "pos_text"
"""Part of the key when a record has it: a query repeated with another positive may have its own rationale."""


def join_key(query: Any, image: Any, positive: Any = None) -> int:
    """A row's key as a 64-bit hash: its query text and image path, and its positive text when given."""
    parts = [str(query or ""), str(image or "")] + ([] if positive is None else [str(positive)])
    return int.from_bytes(hashlib.blake2b("\x00".join(parts).encode("utf-8"), digest_size=8).digest(), "little")


class Rationales:
    """One subset's rationale file, looked up by a row's key (``find``)."""

    def __init__(self, path: Path) -> None:
        datasets = require_extra("datasets", extra="train", needed_by="reading rationale files")
        try:
            table = datasets.load_dataset("json", data_files=str(path), split="train")
        except Exception as error:  # datasets raises many kinds for a file it cannot read, the cause inside
            cause = error.__cause__ or error
            raise TrainingDataError(f"cannot read the rationale file {str(path)!r}: {cause}") from None
        missing = [name for name in (*KEY_FIELDS, "rationale") if name not in table.column_names]
        if missing:
            raise TrainingDataError(f"the rationale file {str(path)!r} has no {missing} field (see docs/training.md)")
        self.path = path
        self.records = table.num_rows
        self.repeated = 0
        """Records whose key an earlier record has (the first one is used)."""
        self._texts = table.data.column("rationale")
        self._rows: dict[int, int] = {}
        columns = [*KEY_FIELDS, POSITIVE_FIELD] if POSITIVE_FIELD in table.column_names else list(KEY_FIELDS)
        row = 0
        for batch in table.select_columns(columns).iter(batch_size=10_000):
            for values in zip(*(batch[name] for name in columns)):
                if self._rows.setdefault(join_key(*values), row) != row:
                    self.repeated += 1
                row += 1

    def _row(self, record: Mapping[str, Any]) -> int | None:
        query, image = record.get("qry"), record.get("qry_image_path")
        row = self._rows.get(join_key(query, image, record.get(POSITIVE_FIELD)))
        return row if row is not None else self._rows.get(join_key(query, image))

    def find(self, record: Mapping[str, Any]) -> Any:
        """The rationale of a snapshot row (a record with ``qry``, ``qry_image_path``, ``pos_text``), or None."""
        row = self._row(record)
        return None if row is None else self._texts[row].as_py() or None

    def count_missing(self, records: Iterable[Mapping[str, Any]]) -> int:
        """How many of ``records`` have no rationale here."""
        return sum(1 for record in records if self._row(record) is None)


def rationale_files(folder: Path, subsets: Iterable[str]) -> dict[str, Path]:
    """``<Subset>.json`` (or ``.jsonl``) of each of ``subsets`` that ``folder`` holds."""
    found = {}
    for subset in subsets:
        files = [folder / f"{subset}{suffix}" for suffix in RATIONALE_SUFFIXES]
        present = [file for file in files if file.is_file()]
        if len(present) > 1:
            raise TrainingDataError(f"{folder} holds both {present[0].name} and {present[1].name}; keep one")
        if present:
            found[subset] = present[0]
    return found


def stray_rationale_files(folder: Path, subsets: Iterable[str]) -> list[str]:
    """Rationale files in ``folder`` that name none of ``subsets`` (a misspelt subset, most likely)."""
    known = set(subsets)
    files = [file for file in folder.iterdir() if file.suffix in RATIONALE_SUFFIXES]
    return sorted(file.name for file in files if file.stem not in known)
