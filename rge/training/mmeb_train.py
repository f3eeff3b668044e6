"""MMEB-train from a local Hugging Face snapshot, streamed: rows are read, rewritten and joined with their
rationales as training reaches them, never all held at once.

A snapshot (``hf download TIGER-Lab/MMEB-train --repo-type dataset --local-dir DIR``) declares one config per
subset in its README.md (``configs:``), each with parquet shards per split (``<Subset>/original-*.parquet``);
a folder without that declaration is read as one subset per sub-folder of ``<split>-*.parquet`` files.
Each subset is a ``datasets`` IterableDataset (``streaming=True``) read in file order; its rows are counted
from the parquet metadata, so the epoch's plan needs no read of the rows.

An epoch's order comes from (seed, epoch) alone, as ``epoch_plan`` gives it in memory:
- ``stream_plan``: which subset fills each slot of each global batch: ceil(rows / batch) one-subset batches
  per subset, shuffled (with ``mix_tasks``: every row's subset, shuffled, cut into batches);
- which row fills a subset's next slot: its rows in a random order drawn from a window of
  ``shuffle_buffer`` rows (``buffered_shuffle``; the whole subset when it is larger); once they are spent,
  its first rows of the epoch again (the filler of a last, short batch).
A row that cannot be used leaves its slot empty and is listed with its step. Resuming at (epoch, batch)
rebuilds that epoch's plan and reads past the rows the batches before it took (no image, no model).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..bad_rows import BadRow, read_bad_rows, write_bad_rows
from ..errors import TrainingDataError, require_extra
from .batches import DataPosition, process_slice
from .config import TrainingConfig
from .data import MMEB_COLUMNS, TrainingExample, parse_row, read_training_data
from .rationales import Rationales, rationale_files, stray_rationale_files

logger = logging.getLogger("rge.training")
Item = TypeVar("Item")
Slot = tuple[int, dict[str, Any]]
"""A subset's row: its position in the subset (file order) and its values."""


@dataclass(frozen=True)
class Subset:
    """One subset of a snapshot: its parquet shards, their row counts, and its rows as a ``datasets`` stream."""

    name: str
    files: tuple[str, ...]
    counts: tuple[int, ...]
    rows: Any
    """A ``datasets.IterableDataset`` over ``files`` in order."""

    @property
    def size(self) -> int:
        return sum(self.counts)

    def locate(self, index: int) -> tuple[str, int]:
        """The file and row number (from 1) of the subset's ``index``-th row."""
        ends = list(itertools.accumulate(self.counts))
        number = bisect.bisect_right(ends, index)
        return self.files[number], index - (ends[number - 1] if number else 0) + 1


def stream_plan(
    counts: Mapping[str, int], global_batch_size: int, *, seed: int, epoch: int, mix_tasks: bool = False
) -> list[tuple[str, ...]]:
    """The epoch's global batches as the subset of each slot (see the module docstring)."""
    rng = random.Random(f"{seed}:{epoch}")
    if not mix_tasks:
        batches = [(name,) * global_batch_size for name in sorted(counts)
                   for _ in range(math.ceil(counts[name] / global_batch_size))]  # fmt: skip
        rng.shuffle(batches)
        return batches
    slots = [name for name in sorted(counts) for _ in range(counts[name])]
    rng.shuffle(slots)
    batches = [tuple(slots[start : start + global_batch_size]) for start in range(0, len(slots), global_batch_size)]
    short = global_batch_size - len(batches[-1]) if batches else 0
    if short:
        batches[-1] += tuple((slots * (short // len(slots) + 1))[:short])
    return batches


def buffered_shuffle(items: Iterable[Item], size: int, rng: random.Random) -> Iterator[Item]:
    """``items`` in a random order: each one drawn from a window of the next ``size`` (all of them, when
    there are no more than ``size``)."""
    window: list[Item] = []
    for item in items:
        if len(window) < size:
            window.append(item)
            continue
        place = rng.randrange(size)
        yield window[place]
        window[place] = item
    rng.shuffle(window)
    yield from window


class _SubsetReader:
    """A subset's rows in the epoch's order; once they are spent, its first rows of the epoch again."""

    def __init__(self, name: str, rows: Iterator[Slot], keep: int) -> None:
        self.name, self.rows, self.keep = name, rows, keep
        self.first: list[Slot] = []
        self.repeated = 0

    def next(self) -> Slot:
        slot = next(self.rows, None)
        if slot is not None:
            if len(self.first) < self.keep:
                self.first.append(slot)
            return slot
        if not self.first:
            raise TrainingDataError(f"subset {self.name} yielded no row (its files changed while training?)")
        self.repeated += 1
        return self.first[(self.repeated - 1) % len(self.first)]


class MMEBTrainStream:
    """An MMEB-train snapshot's subsets, streamed in the order of (seed, epoch); ``open_mmeb_train`` opens one."""

    def __init__(
        self, subsets: Sequence[Subset], image_root: Path, rationales: Mapping[str, Rationales], shuffle_buffer: int
    ) -> None:
        self.subsets = {subset.name: subset for subset in subsets}
        self.image_root, self.rationales, self.shuffle_buffer = image_root, dict(rationales), shuffle_buffer

    @property
    def counts(self) -> dict[str, int]:
        return {name: subset.size for name, subset in self.subsets.items()}

    def batch_count(self, global_batch_size: int, *, mix_tasks: bool = False) -> int:
        """Global batches per epoch."""
        if mix_tasks:
            return math.ceil(sum(self.counts.values()) / global_batch_size)
        return sum(math.ceil(count / global_batch_size) for count in self.counts.values())

    def batches(
        self, start: DataPosition, global_batch_size: int, *, seed: int, mix_tasks: bool = False
    ) -> Iterator[tuple[DataPosition, list[TrainingExample | BadRow]]]:
        """The global batches from ``start`` on, epoch after epoch, each with the position after it."""
        epoch, done = start.epoch, start.batch
        while True:
            plan = stream_plan(self.counts, global_batch_size, seed=seed, epoch=epoch, mix_tasks=mix_tasks)
            readers = {name: _SubsetReader(name, self._ordered(name, seed, epoch), keep=global_batch_size)
                       for name in self.subsets}  # fmt: skip
            for number, names in enumerate(plan, start=1):
                slots = [(name, readers[name].next()) for name in names]
                if number > done:
                    yield DataPosition(epoch, number), [self._parse(name, *slot) for name, slot in slots]
            epoch, done = epoch + 1, 0

    def process_batches(
        self, start: DataPosition, steps: int, *, global_batch_size: int, seed: int, mix_tasks: bool, rank: int,
        world_size: int,
    ) -> Iterator[tuple[DataPosition, list[TrainingExample], list[BadRow]]]:  # fmt: skip
        """``steps`` batches of this process from ``start``: its examples and the rows of its share that
        cannot be used, with the position after each batch."""
        batches = self.batches(start, global_batch_size, seed=seed, mix_tasks=mix_tasks)
        for position, rows in itertools.islice(batches, steps):
            share = process_slice(rows, rank, world_size)
            examples = [row for row in share if isinstance(row, TrainingExample)]
            bad = [row for row in share if isinstance(row, BadRow)]
            if not examples:
                raise TrainingDataError(f"no row of this process's share of a batch can be used, e.g. "
                                        f"{bad[0].file}:{bad[0].line}: {bad[0].error}")  # fmt: skip
            yield position, examples, bad

    def _ordered(self, name: str, seed: int, epoch: int) -> Iterator[Slot]:
        rng = random.Random(f"{seed}:{epoch}:{name}")
        return buffered_shuffle(enumerate(self.subsets[name].rows), self.shuffle_buffer, rng)

    def _parse(self, name: str, index: int, record: dict[str, Any]) -> TrainingExample | BadRow:
        file, line = self.subsets[name].locate(index)
        rationales = self.rationales.get(name)
        rationale = rationales.find(record) if rationales is not None else None
        if rationale is not None:
            record = {**record, "rationale": rationale}
        try:
            return parse_row(record, self.image_root, default_task=name, file=file, line=line)
        except (ValueError, TypeError) as error:
            return BadRow(file=file, line=line, error=str(error))


def open_mmeb_train(
    root: str | Path,
    *,
    image_root: str | Path | None = None,
    subsets: Sequence[str] | None = None,
    split: str = "original",
    rationales: str | Path | None = None,
    shuffle_buffer: int = 10_000,
) -> MMEBTrainStream:
    """The snapshot at ``root``: ``subsets`` (default: all) of ``split``, image paths relative to
    ``image_root`` (default: ``root``), rationales joined from the files of the ``rationales`` folder."""
    datasets = require_extra("datasets", extra="train", needed_by="training on an MMEB-train snapshot")
    root = Path(root)
    builders = _builders(datasets, root)
    chosen = list(subsets) if subsets else sorted(builders)
    unknown = [name for name in chosen if name not in builders]
    if unknown:
        raise TrainingDataError(f"no subset {', '.join(map(repr, unknown))} in {root}; "
                                f"its subsets are: {', '.join(sorted(builders))}")  # fmt: skip
    opened = [_subset(name, builders[name](), split) for name in chosen]
    if not any(subset.size for subset in opened):
        raise TrainingDataError(f"the {split!r} split of {', '.join(chosen)} in {root} has no rows")
    joined = _rationales(Path(rationales), opened, builders) if rationales is not None else {}
    return MMEBTrainStream(opened, Path(image_root) if image_root is not None else root, joined, shuffle_buffer)


def _builders(datasets: Any, root: Path) -> dict[str, Callable[[], Any]]:
    """Each subset's ``datasets`` builder, made when called: the configs the snapshot declares, else one per
    sub-folder holding parquet files."""
    if not root.is_dir():
        raise TrainingDataError(f"{str(root)!r} is not a folder")
    names = datasets.get_dataset_config_names(str(root))
    if names != ["default"]:
        return {name: functools.partial(datasets.load_dataset_builder, str(root), name) for name in names}
    folders = sorted(path for path in root.iterdir() if path.is_dir() and any(path.glob("*.parquet")))
    if not folders:
        raise TrainingDataError(f"{root} declares no subset configs and has no sub-folder of parquet files; "
                                "expected a local snapshot of TIGER-Lab/MMEB-train (see docs/training.md)")  # fmt: skip
    return {folder.name: functools.partial(_folder_builder, datasets, folder) for folder in folders}


def _folder_builder(datasets: Any, folder: Path) -> Any:
    """A parquet builder with one split per ``<split>-*.parquet`` file name prefix of ``folder``."""
    splits: dict[str, list[str]] = {}
    for file in sorted(folder.glob("*.parquet")):
        splits.setdefault(file.stem.split("-")[0], []).append(str(file))
    return datasets.load_dataset_builder("parquet", data_files=splits)


def _subset(name: str, builder: Any, split: str) -> Subset:
    import pyarrow.parquet as pq

    available = list(builder.config.data_files or {})
    if split not in available:
        raise TrainingDataError(f"subset {name} has no split {split!r}; its splits are: {', '.join(available)}")
    files = tuple(str(file) for file in builder.config.data_files[split])
    for file in files:
        missing = [column for column in MMEB_COLUMNS if column not in pq.read_schema(file).names]
        if missing:
            raise TrainingDataError(f"{file} has no column {missing} (MMEB-train's columns: see docs/training.md)")
    counts = tuple(pq.ParquetFile(file).metadata.num_rows for file in files)
    return Subset(name, files, counts, builder.as_streaming_dataset(split=split))


def _rationales(folder: Path, subsets: Sequence[Subset], available: Iterable[str]) -> dict[str, Rationales]:
    """Each subset's rationale file, with a warning for the rows it has no rationale for."""
    if not folder.is_dir():
        raise TrainingDataError(f"rationale folder {str(folder)!r} is not a folder")
    stray = stray_rationale_files(folder, available)
    if stray:
        logger.warning("%s: %s name%s no subset of the snapshot", folder, ", ".join(stray),
                       "" if len(stray) > 1 else "s")  # fmt: skip
    files = rationale_files(folder, [subset.name for subset in subsets])
    joined = {}
    for subset in subsets:
        if subset.name not in files:
            logger.warning("no rationale file for %s in %s (%s.json or .jsonl): its %d rows add no LM loss on their "
                           "query side", subset.name, folder, subset.name, subset.size)  # fmt: skip
            continue
        found = joined[subset.name] = Rationales(files[subset.name])
        if found.repeated:
            logger.warning("%s: records repeating an earlier record's key: %d (the first is used)", found.path,
                           found.repeated)  # fmt: skip
        missing = found.count_missing(_keys(subset))
        if missing:
            logger.warning("%s: %d of %d rows have no rationale in %s (no LM loss on their query side)", subset.name,
                           missing, subset.size, found.path)  # fmt: skip
    return joined


def _keys(subset: Subset) -> Iterator[dict[str, Any]]:
    """The join-key columns of the subset's rows, read from its files a batch at a time."""
    import pyarrow.parquet as pq

    for file in subset.files:
        for batch in pq.ParquetFile(file).iter_batches(columns=["qry", "qry_image_path", "pos_text"]):
            yield from batch.to_pylist()


def read_training_source(
    config: TrainingConfig, *, error_file: Path | None = None, resumed_step: int = 0
) -> list[TrainingExample] | MMEBTrainStream:
    """``config``'s data: its JSONL/parquet files read whole (``read_training_data``), or its snapshot
    folder opened as a stream; then ``error_file`` keeps the rows listed for steps up to ``resumed_step``."""
    folders = [path for path in map(Path, config.data) if path.is_dir()]
    if not folders:
        if config.subsets or config.rationales:
            raise TrainingDataError("subsets and rationales are options of an MMEB-train snapshot folder (--data DIR)")
        return read_training_data(config.data, image_root=config.image_root, error_file=error_file)
    if len(config.data) > 1:
        raise TrainingDataError(f"{folders[0]} is a snapshot folder: give it alone, without data files")
    if error_file is not None:
        keep_bad_rows_through(error_file, resumed_step)
    return open_mmeb_train(folders[0], image_root=config.image_root, subsets=config.subsets, split=config.split,
                           rationales=config.rationales, shuffle_buffer=config.shuffle_buffer)  # fmt: skip


def keep_bad_rows_through(path: Path, step: int) -> None:
    """Keep the rows ``path`` lists for steps up to ``step`` (none: a fresh run); a resumed run lists the
    later steps' rows again as it redoes them."""
    if path.is_file():
        write_bad_rows(path, [row for row in read_bad_rows(path) if row.step is not None and row.step <= step])
