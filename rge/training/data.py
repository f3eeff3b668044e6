"""Training data: JSONL or parquet rows in rge's layout or in MMEB-train's, checked row by row.

rge's layout: ``query``, optional ``query_image``, ``positive``, optional ``positive_image``, optional
``negatives`` (a list of texts and/or ``{"text", "image"}`` objects), optional ``rationale``, optional
``task``. Image paths are relative to ``image_root`` (default: the data file's folder).

MMEB-train's layout: ``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path`` and optionally
``neg_text``, ``neg_image_path``, ``rationale``. Texts are rewritten as the authors' training does it,
per subset (the ``task``/``subset`` column, else the file's folder if it names a subset, else the file
name): ``instruction_replacements.yaml`` for queries, ``candidate_replacements.yaml`` for candidates,
then a trailing newline; the ``<|image_1|>`` marker is removed and the image goes first (none: removed).
Images are loaded as stored (no EXIF rotation), as the authors do.
"""

from __future__ import annotations

import ast
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bad_rows import BadRow, write_bad_rows
from ..corpus_rows import INPUT_SUFFIXES, jsonl_records, parquet_records, stored_image
from ..errors import TrainingDataError
from ..mmeb_rules import load_rules, rewrite
from ..prompts import EMB_TOKEN, MMEB_IMAGE_MARKER
from ..types import ITEM_KEYS

MMEB_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path")

logger = logging.getLogger("rge.training")


@dataclass(frozen=True)
class Side:
    """One side of an example: its text and its image (an absolute path, encoded bytes, or None)."""

    text: str
    image: str | bytes | None = None


@dataclass(frozen=True)
class TrainingExample:
    """A query, its positive, optional hard negatives and supervision rationale, and its task."""

    query: Side
    positive: Side
    negatives: tuple[Side, ...] = ()
    rationale: str | None = None
    """Supervises the LM loss only; None adds no LM loss on this query's side."""
    task: str = ""
    file: str = ""
    line: int = 0
    """Where the row is, for error messages and the error file."""
    exif_transpose: bool = True

    @property
    def source(self) -> str:
        """``file:line``, how messages name the row."""
        return f"{self.file}:{self.line}"


def read_training_data(
    paths: Sequence[str | Path],
    *,
    image_root: str | Path | None = None,
    error_file: str | Path | None = None,
) -> list[TrainingExample]:
    """Every usable row of ``paths`` (JSONL or parquet), in file order; bad rows are written to
    ``error_file`` (JSONL: file, line, error) when given, and skipped, with one warning that counts them."""
    examples: list[TrainingExample] = []
    bad: list[BadRow] = []
    for path in map(Path, paths):
        if path.suffix.lower() not in INPUT_SUFFIXES:
            raise TrainingDataError(f"{str(path)!r}: expected a {', '.join(INPUT_SUFFIXES)} file")
        if not path.is_file():
            raise TrainingDataError(f"training data {str(path)!r} does not exist")
        root = Path(image_root) if image_root is not None else path.parent
        for line, record in _records(path):
            try:
                examples.append(parse_row(record, root, default_task=_subset_of(path), file=str(path), line=line))
            except (ValueError, TypeError) as error:
                bad.append(BadRow(file=str(path), line=line, error=str(error)))
    if error_file is not None:
        write_bad_rows(Path(error_file), bad)
    if bad and examples:
        listed = f", listed in {error_file}" if error_file is not None else ""
        logger.warning("%d of %d rows cannot be used and are skipped%s", len(bad), len(bad) + len(examples), listed)
    if not examples:
        where = f" ({len(bad)} bad rows{f', see {error_file}' if error_file else ''})" if bad else ""
        raise TrainingDataError(f"no usable training rows in {', '.join(map(str, paths))}{where}")
    return examples


def parse_row(
    record: Any, image_root: Path, *, default_task: str = "", file: str = "", line: int = 0
) -> TrainingExample:
    """One row in either layout -> a TrainingExample; ValueError/TypeError naming the problem."""
    if isinstance(record, json.JSONDecodeError):
        raise ValueError(f"invalid JSON: {record.msg}")
    if not isinstance(record, dict):
        raise TypeError(f"expected an object, got {type(record).__name__}")
    if "qry" in record:
        return _mmeb_row(record, image_root, default_task, file, line)
    return _rge_row(record, image_root, default_task, file, line)


def _rge_row(record: dict[str, Any], root: Path, default_task: str, file: str, line: int) -> TrainingExample:
    query = Side(_text(record, "query", required=True), _image(record.get("query_image"), root, "query_image"))
    positive = Side(
        _text(record, "positive", required=record.get("positive_image") is None),
        _image(record.get("positive_image"), root, "positive_image"),
    )
    if not query.text and query.image is None:
        raise ValueError("'query' is empty and there is no 'query_image'")
    negatives = record.get("negatives") or []
    if not isinstance(negatives, list):
        raise TypeError(f"'negatives' must be a list, got {type(negatives).__name__}")
    return TrainingExample(
        query=query,
        positive=positive,
        negatives=tuple(_negative(entry, root, number) for number, entry in enumerate(negatives)),
        rationale=_rationale(record.get("rationale")),
        task=str(record.get("task") or default_task),
        file=file,
        line=line,
    )


def _negative(entry: Any, root: Path, number: int) -> Side:
    if isinstance(entry, str):
        return Side(entry)
    if isinstance(entry, dict) and set(entry) <= set(ITEM_KEYS) and entry:
        text = entry.get("text") or ""
        if not isinstance(text, str):
            raise TypeError(f"negatives[{number}]['text'] must be a string")
        return Side(text, _image(entry.get("image"), root, f"negatives[{number}]['image']"))
    raise TypeError(f"negatives[{number}] must be a text or an object with 'text' and/or 'image'")


def _mmeb_row(record: dict[str, Any], root: Path, default_task: str, file: str, line: int) -> TrainingExample:
    missing = [column for column in MMEB_COLUMNS if column not in record]
    if missing:
        raise ValueError(f"MMEB-train row without {missing}")
    subset = str(record.get("task") or record.get("subset") or default_task)
    query_rules, candidate_rules = load_rules("training_query").get(subset, {}), load_rules("candidate").get(subset, {})
    query = _mmeb_side(rewrite(_text(record, "qry", required=True), query_rules), record["qry_image_path"], root)
    positive = _mmeb_side(rewrite(_text(record, "pos_text"), candidate_rules), record["pos_image_path"], root)
    texts, paths = _listed(record.get("neg_text")), _listed(record.get("neg_image_path"))
    if texts and paths and len(texts) != len(paths):
        raise ValueError(f"'neg_text' has {len(texts)} entries but 'neg_image_path' {len(paths)}")
    negatives = [
        _mmeb_side(rewrite(text, candidate_rules), path, root)
        for text, path in zip(texts or [""] * len(paths), paths or [""] * len(texts))
    ]
    rationale = _rationale(record.get("rationale"))
    return TrainingExample(query, positive, tuple(negatives), rationale, subset, file, line, exif_transpose=False)


def _mmeb_side(text: str, image_path: Any, root: Path) -> Side:
    """The authors' training input: the marker removed from the text, the image (if any) placed first."""
    image = _image(image_path or None, root, "image path")
    return Side(text.replace(MMEB_IMAGE_MARKER, ""), image)


def _listed(value: Any) -> list[str]:
    """MMEB-train stores negatives as a list, or as the text of a Python list, or as one string."""
    if value is None or value == "":
        return []
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"cannot read the list {value[:60]!r}") from None
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(entry, str) for entry in values):
        raise TypeError("negatives must be strings")
    return list(values)


def _text(record: dict[str, Any], key: str, *, required: bool = False) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise ValueError(f"missing {key!r}")
        return ""
    if not isinstance(value, str):
        raise TypeError(f"{key!r} must be a string, got {type(value).__name__}")
    return value


def _image(value: Any, root: Path, what: str) -> str | bytes | None:
    if value is None:
        return None
    value = stored_image(value)
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a path or image bytes, got {type(value).__name__}")
    path = root / value
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    return str(path)


def _rationale(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise TypeError(f"'rationale' must be a string, got {type(value).__name__}")
    if EMB_TOKEN in value:
        raise ValueError(f"'rationale' contains {EMB_TOKEN}, which rge appends itself")
    return value


def _records(path: Path) -> Iterable[tuple[int, Any]]:
    return parquet_records(path) if path.suffix.lower() == ".parquet" else jsonl_records(path)


def _subset_of(path: Path) -> str:
    """A file's MMEB-train subset: its folder when that names one (the hub snapshot's layout), else its name."""
    if path.parent.name in load_rules("training_query") or path.parent.name in load_rules("candidate"):
        return path.parent.name
    return path.stem
