"""Reading a corpus for ``rge encode``: rows of a JSONL or parquet file, streamed and checked one by one."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bad_rows import BadRow

INPUT_SUFFIXES = (".jsonl", ".ndjson", ".parquet")


@dataclass(frozen=True)
class Fields:
    """Which keys (JSONL) or columns (parquet) hold each row's id, text and image, and which other keys to
    leave out on purpose (``ignore``): any other key is refused, so a misspelled field never drops data."""

    id: str = "id"
    text: str = "text"
    image: str = "image"
    ignore: tuple[str, ...] = ()


DEFAULT_FIELDS = Fields()


@dataclass(frozen=True)
class CorpusRow:
    """One input row: its position (0-based, blank lines skipped), id, text and image (a path or bytes)."""

    position: int
    line: int
    id: str
    text: str
    image: str | bytes | None


def read_corpus(path: str | Path, fields: Fields = DEFAULT_FIELDS) -> Iterator[CorpusRow | BadRow]:
    """Stream the rows of a JSONL file (one object per line) or a parquet file, mapped by ``fields``.

    An image is a path (relative to the input file's folder unless absolute), encoded bytes, or a
    ``{"bytes", "path"}`` struct as Hugging Face datasets store images. A repeated id is a bad row naming
    the line of its first use. Keys no field maps are not read (``input_keys`` finds them first).
    """
    path = Path(path)
    records = parquet_records(path) if path.suffix.lower() == ".parquet" else jsonl_records(path)
    first_line: dict[str, int] = {}
    for position, (line, record) in enumerate(records):
        row = _row(position, line, record, path.parent, fields)
        if isinstance(row, CorpusRow):
            first = first_line.setdefault(row.id, line)
            if first != line:
                message = f"duplicate id {row.id!r} (first at line {first})"
                row = BadRow(position=position, line=line, id=row.id, error=message)
        yield row


def count_rows(path: str | Path) -> int:
    """Rows in the input, without parsing them (for the progress bar and the shard plan)."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def missing_columns(path: Path, fields: Fields) -> list[str]:
    """Mapped columns a parquet input lacks (the id, and text and image both); [] for JSONL."""
    if path.suffix.lower() != ".parquet":
        return []
    import pyarrow.parquet as pq

    columns = set(pq.ParquetFile(path).schema_arrow.names)
    missing = [] if fields.id in columns else [fields.id]
    if fields.text not in columns and fields.image not in columns:
        missing += [fields.text, fields.image]
    return missing


def input_keys(path: Path) -> set[str]:
    """Every key of the input's rows (JSONL: one pass over all objects) or every column (parquet).

    A job is checked before its model loads and again when it starts (``check_job``): the second check
    reuses the first one's keys while the file is unchanged (same size and modification time)."""
    stat = path.stat()
    return set(_keys(path.resolve(), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _keys(path: Path, size: int, modified_ns: int) -> frozenset[str]:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return frozenset(pq.ParquetFile(path).schema_arrow.names)
    keys: set[str] = set()
    for _, record in jsonl_records(path):
        if isinstance(record, dict):
            keys.update(record)
    return frozenset(keys)


def stored_image(value: Any) -> Any:
    """An image column's value as a path or bytes: the bytes of a Hugging Face datasets image struct
    (``{"bytes", "path"}``), else its path; any other value as it is (the callers check its type)."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path")
    return value


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or the JSONDecodeError) per non-blank line."""
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                yield number, error


def parquet_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(row number from 1, row as a dict), read 1024 rows at a time."""
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            number += 1
            yield number, record


def _row(position: int, line: int, record: Any, base: Path, fields: Fields) -> CorpusRow | BadRow:
    if isinstance(record, json.JSONDecodeError):
        return BadRow(position=position, line=line, error=f"invalid JSON: {record.msg}")
    if not isinstance(record, dict):
        return BadRow(position=position, line=line, error=f"expected an object, got {type(record).__name__}")
    row_id = record.get(fields.id)
    if row_id is None or isinstance(row_id, (dict, list, bool)):
        return BadRow(position=position, line=line, error=f"missing or invalid {fields.id!r}")
    text, image = record.get(fields.text) or "", record.get(fields.image) or None
    if not isinstance(text, str):
        message = f"{fields.text!r} must be a string, got {type(text).__name__}"
        return BadRow(position=position, line=line, id=str(row_id), error=message)
    image = stored_image(image) or None
    if image is not None and not isinstance(image, (str, bytes)):
        message = f"{fields.image!r} must be a path string or image bytes, got {type(image).__name__}"
        return BadRow(position=position, line=line, id=str(row_id), error=message)
    if isinstance(image, str):
        image = str(base / image)
    return CorpusRow(position, line, str(row_id), text, image)
