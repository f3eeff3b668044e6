"""Corpus encoding at scale: stream rows from JSONL or parquet, write resumable shards, load them back.

Rows are partitioned by their position in the input: shard ``k`` holds rows ``k*S .. (k+1)*S - 1``.
Each shard is written under a temporary name and renamed when complete, so after any crash (``kill -9``
included) a shard is either whole or absent; a rerun validates the shards it finds, rewrites any that
do not check out, and computes only what is missing. The result equals an uninterrupted run row for row.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
from tqdm.auto import tqdm

from .bad_rows import ERROR_FILE, BadRow, write_bad_rows
from .corpus_rows import (
    DEFAULT_FIELDS,
    INPUT_SUFFIXES,
    CorpusRow,
    Fields,
    count_rows,
    input_keys,
    missing_columns,
    read_corpus,
)
from .errors import RGEInputError, RGEJobError
from .storage import atomic_write_json, changed_settings, load_arrays, save_arrays
from .types import CorpusSide, EncoderProtocol

MANIFEST = "manifest.json"


@dataclass
class JobReport:
    """What an ``encode_corpus`` run produced."""

    rows: int
    encoded: int
    failed: int
    shards: int
    output: Path
    errors: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ShardPlan:
    """Which positions each shard covers."""

    rows: int
    shard_size: int

    @property
    def shards(self) -> int:
        return -(-self.rows // self.shard_size)

    def shard_of(self, position: int) -> int:
        return position // self.shard_size

    def rows_in(self, shard: int) -> int:
        return max(0, min(self.shard_size, self.rows - shard * self.shard_size))

    @staticmethod
    def path(output: Path, shard: int) -> Path:
        return output / f"shard-{shard:05d}.safetensors"


Chunk = tuple[list[CorpusRow], list[BadRow]]
Result = tuple[np.ndarray, list[str], dict[int, str]]
"""Embeddings and rationales of a chunk's encoded rows (in order), and an error per rejected position."""
EncodeRows = Callable[[Iterator[Chunk]], Iterator[tuple[Chunk, Result]]]
"""Turns chunks into results, in order: one process (``local_encode_rows``) or a Ray cluster."""


def check_job(
    input_path: str | Path, output_dir: str | Path, settings: dict[str, Any], fields: Fields = DEFAULT_FIELDS
) -> None:
    """Refuse a job that cannot run, before any model is loaded: a missing input, one that is not JSONL or
    parquet, a parquet input without the mapped columns, an output that is a file, an output folder
    holding an index made with other ``settings``, or an input with keys that no field maps and
    ``fields.ignore`` does not name (read in one pass over the rows, last, as the slowest check)."""
    input_path, output = Path(input_path), Path(output_dir)
    if not input_path.is_file():
        raise RGEJobError(f"input file {str(input_path)!r} not found")
    if input_path.suffix.lower() not in INPUT_SUFFIXES:
        raise RGEJobError(f"input {str(input_path)!r} is not JSONL or parquet (expected {', '.join(INPUT_SUFFIXES)})")
    missing = missing_columns(input_path, fields)
    if missing:
        raise RGEJobError(f"{str(input_path)!r} has no column {' or '.join(map(repr, missing))}; map one with "
                          "--id-field / --text-field / --image-field")  # fmt: skip
    if output.exists() and not output.is_dir():
        raise RGEJobError(f"output {str(output)!r} is a file; give a folder")
    changed = changed_settings(output / MANIFEST, settings)
    if changed:
        raise RGEJobError(
            f"{output} holds an index made with other settings {changed} (before, now); "
            "use another --output folder or the original settings"
        )
    unmapped = _unmapped_keys_message(input_path, fields)
    if unmapped:
        raise RGEJobError(unmapped)


def _unmapped_keys_message(input_path: Path, fields: Fields) -> str | None:
    """Why the input's keys that no field maps cannot be left out silently, or None when there are none."""
    keys = input_keys(input_path)
    unmapped = sorted(keys - {fields.id, fields.text, fields.image, *fields.ignore})
    if not unmapped:
        return None
    options = {"--id-field": fields.id, "--text-field": fields.text, "--image-field": fields.image}
    absent = {option: key for option, key in options.items() if key not in keys}
    unused = f" (no row has {' or '.join(map(repr, absent.values()))})" if absent else ""
    named, options_named = ", ".join(map(repr, unmapped)), " / ".join(absent or options)
    return (f"{str(input_path)!r} has keys that no field maps: {named}{unused}; map one with {options_named} KEY, "
            f"or leave them out with --ignore-fields {','.join(unmapped)}")  # fmt: skip


def encode_corpus(
    input_path: str | Path,
    output_dir: str | Path,
    settings: dict[str, Any],
    encode_rows: EncodeRows,
    *,
    chunk_size: int,
    shard_size: int = 10000,
    progress: bool = True,
    fields: Fields = DEFAULT_FIELDS,
) -> JobReport:
    """Encode the corpus into ``output_dir``; ``encode_rows`` turns chunks of rows into results, in order.

    ``settings`` (model, side, pixel budget, ...) is recorded in the manifest; a rerun with other settings
    is refused. ``fields`` names the id, text and image keys and the keys to leave out; any other key is
    refused (``RGEJobError``) before ``encode_rows`` runs. Returns counts and the bad rows (also written to
    ``errors.jsonl``).
    """
    input_path, output = Path(input_path), Path(output_dir)
    check_job(input_path, output, settings, fields)
    plan = ShardPlan(count_rows(input_path), shard_size)
    if plan.rows == 0:
        raise RGEJobError(f"{input_path} has no rows to encode")
    job = {**settings, "input": str(input_path.resolve()), "shard_size": shard_size, "rows": plan.rows}
    _start(output, job)
    done = {shard for shard in range(plan.shards) if _valid_shard(output, plan, shard)}
    pending = _pending_chunks(read_corpus(input_path, fields), plan, done, chunk_size)
    with tqdm(total=plan.rows, desc="encoding", unit="row", disable=not progress, smoothing=0.05) as bar:
        bar.update(sum(plan.rows_in(shard) for shard in done))
        writer = _ShardWriter(output, plan)
        for (rows, bad), (vectors, rationales, failed) in encode_rows(pending):
            writer.add(rows, bad, vectors, rationales, failed)
            bar.update(len(rows) + len(bad))
    return _finish(output, plan, job)


def _start(output: Path, job: dict[str, Any]) -> None:
    changed = changed_settings(output / MANIFEST, job)
    if changed:
        raise RGEJobError(f"{output} holds an index of another input {changed} (before, now); use another --output")
    output.mkdir(parents=True, exist_ok=True)
    for leftover in output.glob(".*.tmp-*"):
        leftover.unlink()
    atomic_write_json(output / MANIFEST, {**job, "complete": False})


def _valid_shard(output: Path, plan: ShardPlan, shard: int) -> bool:
    """A shard file that loads, covers exactly its positions and agrees with itself; others are removed."""
    path = ShardPlan.path(output, shard)
    if not path.exists():
        return False
    try:
        arrays, meta = load_arrays(path)
        positions = meta["positions"] + [error["position"] for error in meta["errors"]]
        expected = set(range(shard * plan.shard_size, shard * plan.shard_size + plan.rows_in(shard)))
        ok = len(meta["ids"]) == len(meta["positions"]) == arrays["embeddings"].shape[0] and set(positions) == expected
    except Exception:  # noqa: BLE001 - any unreadable shard is recomputed
        ok = False
    if not ok:
        path.unlink()
    return ok


def _pending_chunks(
    rows: Iterator[CorpusRow | BadRow], plan: ShardPlan, done: set[int], chunk_size: int
) -> Iterator[Chunk]:
    """Rows of shards still to compute, in chunks that never straddle two shards."""
    good: list[CorpusRow] = []
    bad: list[BadRow] = []
    current = None
    for row in rows:
        shard = plan.shard_of(_position(row))
        if shard in done:
            continue
        if current is not None and (shard != current or len(good) >= chunk_size):
            yield good, bad
            good, bad = [], []
        current = shard
        (good if isinstance(row, CorpusRow) else bad).append(row)  # type: ignore[arg-type]
    if good or bad:
        yield good, bad


def _position(row: CorpusRow | BadRow) -> int:
    """A row's position in the input (a corpus's bad rows have one too)."""
    assert row.position is not None
    return row.position


class _ShardWriter:
    """Collects results of one shard at a time and writes it when its last row is in."""

    def __init__(self, output: Path, plan: ShardPlan) -> None:
        self.output, self.plan = output, plan
        self._reset(None)

    def _reset(self, shard: int | None) -> None:
        self.shard = shard
        self.vectors: list[np.ndarray] = []
        self.ids: list[str] = []
        self.positions: list[int] = []
        self.rationales: list[str] = []
        self.errors: list[dict[str, Any]] = []

    def add(
        self,
        rows: list[CorpusRow],
        bad: list[BadRow],
        vectors: np.ndarray,
        rationales: list[str],
        failed: dict[int, str],
    ) -> None:
        shard = self.plan.shard_of(_position((rows or bad)[0]))
        if self.shard is None:
            self._reset(shard)
        good = [row for row in rows if row.position not in failed]
        self.vectors.append(vectors)
        self.ids += [row.id for row in good]
        self.positions += [row.position for row in good]
        self.rationales += rationales
        rejected = [BadRow(position=row.position, line=row.line, id=row.id, error=failed[row.position])
                    for row in rows if row.position in failed]  # fmt: skip
        self.errors += [row.record() for row in [*rejected, *bad]]
        if len(self.positions) + len(self.errors) == self.plan.rows_in(shard):
            self._write()

    def _write(self) -> None:
        assert self.shard is not None
        width = self.vectors[0].shape[1] if self.vectors else 0
        embeddings = np.concatenate(self.vectors) if self.vectors else np.zeros((0, width), np.float32)
        order = np.argsort(self.positions, kind="stable")
        meta = {
            "ids": [self.ids[i] for i in order],
            "positions": [self.positions[i] for i in order],
            "rationales": [self.rationales[i] for i in order] if self.rationales else [],
            "errors": sorted(self.errors, key=lambda error: error["position"]),
        }
        save_arrays(ShardPlan.path(self.output, self.shard), {"embeddings": embeddings[order]}, meta)
        self._reset(None)


def _finish(output: Path, plan: ShardPlan, job: dict[str, Any]) -> JobReport:
    errors: list[dict[str, Any]] = []
    encoded = 0
    for shard in range(plan.shards):
        _, meta = load_arrays(ShardPlan.path(output, shard))
        errors += meta["errors"]
        encoded += len(meta["ids"])
    write_bad_rows(output / ERROR_FILE, [BadRow(**error) for error in errors])
    atomic_write_json(
        output / MANIFEST,
        {**job, "complete": True, "encoded": encoded, "failed": len(errors), "shards": plan.shards},
    )
    return JobReport(plan.rows, encoded, len(errors), plan.shards, output, errors)


# fmt: off
@overload
def load_embeddings(
    path: str | Path, *, return_ids: Literal[False] = ..., return_rationales: Literal[False] = ...
) -> np.ndarray: ...
@overload
def load_embeddings(
    path: str | Path, *, return_ids: Literal[True], return_rationales: Literal[False] = ...
) -> tuple[np.ndarray, list[str]]: ...
@overload
def load_embeddings(
    path: str | Path, *, return_ids: Literal[False] = ..., return_rationales: Literal[True]
) -> tuple[np.ndarray, list[str]]: ...
@overload
def load_embeddings(
    path: str | Path, *, return_ids: Literal[True], return_rationales: Literal[True]
) -> tuple[np.ndarray, list[str], list[str]]: ...
@overload
def load_embeddings(
    path: str | Path, *, return_ids: bool = ..., return_rationales: bool = ...
) -> np.ndarray | tuple[np.ndarray, list[str]] | tuple[np.ndarray, list[str], list[str]]: ...
# fmt: on
def load_embeddings(path: str | Path, *, return_ids: bool = False, return_rationales: bool = False) -> Any:
    """The (N, D) float32 embeddings of an ``rge encode`` output, in input order (failed rows left out).

    With ``return_ids=True`` and/or ``return_rationales=True``, a tuple: ``(embeddings, ids, rationales)``
    with what was asked for. The rationales are the texts ``encode_query(..., return_rationales=True)``
    gives (``--side query``); "" for each row of a ``--side document`` index, as on the candidate path.
    """
    output = Path(path)
    manifest_path = output / MANIFEST
    if not manifest_path.exists():
        raise RGEJobError(f"{output} is not an rge encode output (no {MANIFEST})")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if not manifest.get("complete"):
        raise RGEJobError(f"{output} is unfinished; rerun the same rge encode command to complete it")
    vectors, ids, rationales = [], [], list[str]()
    for shard in range(manifest["shards"]):
        arrays, meta = load_arrays(ShardPlan.path(output, shard))
        vectors.append(arrays["embeddings"])
        ids += meta["ids"]
        rationales += meta["rationales"] or [""] * len(meta["ids"])
    embeddings = np.concatenate(vectors).astype(np.float32, copy=False)
    extras = [values for values, wanted in ((ids, return_ids), (rationales, return_rationales)) if wanted]
    return (embeddings, *extras) if extras else embeddings


def local_encode_rows(encoder: EncoderProtocol, side: CorpusSide, batch_size: int) -> EncodeRows:
    """``encode_rows`` for one process: each chunk goes through ``encoder``; bad rows are reported, not fatal."""

    def encode_rows(chunks: Iterator[Chunk]) -> Iterator[tuple[Chunk, Result]]:
        for chunk in chunks:
            yield chunk, encode_chunk(encoder, chunk[0], side, batch_size)

    return encode_rows


def encode_chunk(encoder: EncoderProtocol, rows: Sequence[CorpusRow], side: CorpusSide, batch_size: int) -> Result:
    """Encode ``rows``; rows the encoder rejects are reported by position instead of failing the chunk."""
    items = [{"text": row.text, **({"image": row.image} if row.image else {})} for row in rows]
    vectors, rationales, failed = encode_items_skipping(encoder, items, side == "query", batch_size)
    return vectors, rationales, {rows[index].position: message for index, message in failed.items()}


def encode_items_skipping(
    encoder: EncoderProtocol, items: list[dict[str, Any]], reason: bool, batch_size: int
) -> tuple[np.ndarray, list[str], dict[int, str]]:
    """Embeddings and rationales of the items the encoder accepts, and the error of each rejected index.

    A rejected item is dropped and the call retried; validation runs before any model work, so a retry
    costs no model time.
    """
    remaining, failed = list(range(len(items))), dict[int, str]()
    while remaining:
        try:
            vectors, rationales = encoder.encode(
                [items[i] for i in remaining],
                reason=reason,
                batch_size=batch_size,
                return_rationales=True,
                show_progress_bar=False,
            )
            return vectors, list(rationales) if reason else [], failed
        except RGEInputError as error:
            if error.index is None:
                raise
            failed[remaining.pop(error.index)] = error.reason
    return np.zeros((0, encoder.embedding_dim), np.float32), [], failed


__all__ = [
    "BadRow",
    "CorpusRow",
    "Fields",
    "JobReport",
    "RGEJobError",
    "encode_corpus",
    "load_embeddings",
    "read_corpus",
]
