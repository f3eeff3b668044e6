"""A running decode that takes queries at any step boundary: the loop behind ``ReasoningDecoder.run``,
and what a server drives as requests come and go.

Queries wait in arrival order; the image work of the next ``rows`` of them is started in workers
(``prefetch``) as they wait. At a step boundary, once enough of the running batch is free (or when
nothing runs), waiting queries whose inputs are ready are admitted: each takes a free output row, the
newcomers are prefilled in groups of similar length and merged into the batch. Each ``step`` feeds
every running row once and hands back the queries that finished in it, so a caller can answer as soon
as its own queries are done. A cancelled query leaves the batch before the next step. On out-of-memory,
unfinished queries start again with half the rows (finished ones keep their results), and a warning
says so. The stream drives the batch through ``DecodeBatches`` (``batches.py``), whatever its KV cache.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .batches import DecodeBatches, FinishedRow
from .batching import TokenizedItem, length_groups, longest_first
from .memory import release_memory

logger = logging.getLogger("rge.engine")

Prefetch = Callable[[Sequence[TokenizedItem], Callable[[], None] | None], None]
"""Starts making the inputs of these items in workers; the callback (if any) runs as each is ready."""


@dataclass(frozen=True)
class FinishedQuery:
    """A query whose ``<emb>`` was fed: its key, embedding (float32 on the CPU, not normalised) and the
    token ids it generated (``<emb>`` included when it was emitted within the budget)."""

    key: Hashable
    embedding: torch.Tensor
    token_ids: list[int]


class DecodeStream:
    """Decodes the queries submitted to it, ``rows`` at most at once (default: the batch size).

    Not thread-safe: one thread submits, cancels and steps (a server's engine loop). Without ``on_ready``
    queries are admitted in arrival order, a step waiting for their inputs if they are not made yet, so a
    run forms the same batches every time; with it, a step admits only queries whose inputs are ready and
    never waits, and ``on_ready`` is called (from a worker) when inputs become ready.
    """

    def __init__(
        self,
        batches: DecodeBatches,
        *,
        rows: int | None = None,
        prefetch: Prefetch | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        config = batches.config
        self.batches, self.prefetch, self._on_ready = batches, prefetch, on_ready
        self.rows = max(1, min(config.batch_size, rows or config.batch_size))
        self._free_rows = list(range(self.rows - 1, -1, -1))
        self._waiting: deque[tuple[Hashable, TokenizedItem]] = deque()
        self._admitted: dict[int, tuple[Hashable, TokenizedItem]] = {}  # output row -> (key, item)
        self._running: Any = None
        self._limit, self._admit_at = self.rows, config.admit_at(self.rows)

    @property
    def busy(self) -> bool:
        """Whether any query waits or decodes."""
        return bool(self._waiting) or self._running is not None

    @property
    def can_step(self) -> bool:
        """Whether ``step`` has work it can do now: rows decode, or a waiting query's inputs are ready (or it
        would wait for them)."""
        if self._running is not None:
            return True
        return bool(self._waiting) and (self._on_ready is None or any(self._ready(item) for _, item in self._waiting))

    @property
    def waiting(self) -> int:
        """Queries submitted and not yet admitted."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Queries in the running batch."""
        return 0 if self._running is None else int(self._running.size)

    @property
    def running_keys(self) -> list[Hashable]:
        """Keys of the queries in the running batch, in batch order."""
        return [] if self._running is None else [self._admitted[row][0] for row in self._running.output_rows_list()]

    def submit(self, queries: Iterable[tuple[Hashable, TokenizedItem]]) -> None:
        """Queue ``(key, item)`` pairs; keys must be unique among queries not yet finished."""
        self._waiting.extend(queries)
        self._prefetch()

    def cancel(self, keys: Iterable[Hashable]) -> None:
        """Forget these queries, waiting or running; their rows leave the batch now."""
        dropped = set(keys)
        self._waiting = deque(entry for entry in self._waiting if entry[0] not in dropped)
        self._prefetch()  # the window of prefetched queries moves up over the ones that left
        rows = {row for row, (key, _) in self._admitted.items() if key in dropped}
        if not rows:
            return
        for row in rows:
            del self._admitted[row]
            self._free_rows.append(row)
        running = self._running
        if running is not None:
            order = running.output_rows_list()
            keep = [position for position, row in enumerate(order) if row not in rows]
            if len(keep) < len(order):
                self._running = self.batches.keep(running, keep)
                if self._running is None:
                    self.batches.release(running)

    def step(self) -> list[FinishedQuery]:
        """Admit waiting queries if there is room, feed every running row once; the queries finished."""
        try:
            if self._waiting and self._may_admit():
                self._admit()
            running = self._running
            if running is None:
                return []
            self._running, finished = self.batches.step(running)
            if self._running is None:
                self.batches.release(running)
        except torch.OutOfMemoryError:
            if self._limit == 1:
                raise
            self._restart_smaller()
        else:
            return [self._finish(row) for row in finished]
        release_memory()  # out of the handler: the failed step's tensors are gone now
        return []

    def _may_admit(self) -> bool:
        if self._running is None:
            return True
        return self.batches.config.admission and self._limit - self._running.size >= self._admit_at

    def _admit(self) -> None:
        free = self._limit - self.running
        if self._on_ready is None:  # in arrival order, waiting for inputs if need be: the same batches every run
            chosen = list(itertools.islice(self._waiting, free))
        else:  # never wait: whoever is ready
            chosen = [entry for entry in self._waiting if self._ready(entry[1])][:free]
        if not chosen:
            return
        taken = {id(entry) for entry in chosen}
        self._waiting = deque(entry for entry in self._waiting if id(entry) not in taken)
        self._prefetch()
        newcomers = [self._take_row(*entry) for entry in chosen]
        self.batches.choice.admit(
            [item.index for item in newcomers], [self._admitted[item.index][0] for item in newcomers]
        )
        for group in length_groups(sorted(newcomers, key=longest_first), self.batches.config.max_padding):
            self._running = self.batches.merge(self._running, self.batches.prefill(group), self._limit)

    def _ready(self, item: TokenizedItem) -> bool:
        """Whether ``item`` can be admitted without waiting (without prefetching, its inputs are made when
        batched, so it always can)."""
        return self.prefetch is None or item.ready()

    def _prefetch(self) -> None:
        """Start the input work of the next ``rows`` waiting queries."""
        if self.prefetch is not None and self._waiting:
            ahead = [item for _, item in itertools.islice(self._waiting, self.rows)]
            self.prefetch(ahead, self._on_ready)

    def _take_row(self, key: Hashable, item: TokenizedItem) -> TokenizedItem:
        """Give a query a free output row; it becomes the index its batch row carries."""
        row = self._free_rows.pop()
        self._admitted[row] = (key, item)
        return replace(item, index=row)

    def _finish(self, finished: FinishedRow) -> FinishedQuery:
        key, _ = self._admitted.pop(finished.row)
        self._free_rows.append(finished.row)
        return FinishedQuery(key, finished.embedding, finished.token_ids)

    def _restart_smaller(self) -> None:
        """After out-of-memory: unfinished queries wait again (longest first), with half the rows. The running
        batch's cache is dropped, not kept for reuse: it may be what did not fit (the next is sized anew)."""
        retry = list(self._admitted.values())
        self._free_rows.extend(self._admitted)
        self._admitted.clear()
        self._waiting.extendleft(sorted(retry, key=lambda entry: longest_first(entry[1]), reverse=True))
        self._running = None
        self._limit = max(1, self._limit // 2)
        self._admit_at = min(self._admit_at, self.batches.config.admit_at(self._limit))
        logger.warning("rge: out of memory decoding %d queries; going on with at most %d at once",
                       len(retry), self._limit)  # fmt: skip
        self._prefetch()
