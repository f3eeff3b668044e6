"""A preallocated KV cache that is also the state of a running batch: one slot per row, nothing reallocated.

transformers' ``DynamicCache`` concatenates every layer's keys and values at each step (a copy of the
whole cache) and ``batch_select_indices`` copies every kept row when a row finishes. ``SlotCache`` holds
one buffer per K and V, ``[layers, slots, kv_heads, capacity, head_dim]``, a mask ``[slots, capacity]``,
and each row's decoding state in slot buffers (the token it feeds next, its positions, its count of
generated tokens and their history, its output row, and the ids the repetition penalty applies to, one
per column like the keys, so that a row's ids are a fixed-shape buffer too):

- the running rows are slots ``0..rows-1``; the columns in use are ``start..end`` (one write pointer for
  all rows, which are left-padded and masked, as in any batch);
- a decode step writes one column in place and updates the row state in place, so a captured step
  replays on the same addresses;
- a finished row's slot is refilled by moving one of the last rows into it (only finished-row count of
  rows move, never the whole cache), and columns no row uses any more are dropped by moving ``start``;
- admitted queries' prefill caches and state are copied into free slots, right-aligned at ``end``;
- when ``end`` reaches the capacity, the used columns move back to the left once (rare: the capacity
  leaves room for the longest prompt plus the reasoning budget twice over);
- a newcomer longer than the capacity allows (a server's queries arrive in any order) makes the buffers
  grow once, by at least half, to a multiple of ``COLUMN_ROUNDING`` columns.

The layers transformers calls hold the cache weakly: a cache nobody uses is freed at once, not at the
next cycle collection (its buffers can be the largest allocation of the process).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

COLUMN_ROUNDING = 128
"""Capacities are multiples of this (attention over the whole capacity pads nothing more)."""
BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
"""Row counts a fixed-shape step runs (its rows padded up to one), and slot counts caches are made with."""


def bucket_for(rows: int, slots: int) -> int:
    """The smallest bucket that holds ``rows`` (never more than ``slots``)."""
    return min(next((size for size in BUCKETS if size >= rows), rows), slots)


class _SlotLayer(DynamicLayer):
    """One layer's view of the shared buffers, as transformers' attention layers call it."""

    def __init__(self, cache: SlotCache, index: int) -> None:
        super().__init__()
        self.cache: SlotCache = weakref.proxy(cache)
        self.index, self.is_initialized = index, True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The buffers exist from the start."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        cache, width = self.cache, key_states.shape[-2]
        if cache.static_rows is not None:  # a fixed-shape decode step (static_step.py): no Python ints
            rows = cache.static_rows
            cache.keys[self.index, :rows].index_copy_(2, cache.write_at, key_states)
            cache.values[self.index, :rows].index_copy_(2, cache.write_at, value_states)
            return cache.keys[self.index, :rows], cache.values[self.index, :rows]
        rows, end = cache.rows, cache.end
        cache.keys[self.index, :rows, :, end : end + width] = key_states
        cache.values[self.index, :rows, :, end : end + width] = value_states
        used = slice(cache.start, end + width)
        return cache.keys[self.index, :rows, :, used], cache.values[self.index, :rows, :, used]

    def get_seq_length(self) -> int:
        return self.cache.end - self.cache.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


class SlotCache(Cache):
    """Preallocated keys, values and row state for up to ``slots`` rows and ``capacity`` columns; see the
    module. ``max_new_tokens`` sizes the history; with ``penalize``, each row's ids are kept for the
    repetition penalty."""

    def __init__(
        self,
        config: Any,
        slots: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        max_new_tokens: int,
        penalize: bool,
    ) -> None:
        text = config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        layers = text.num_hidden_layers
        super().__init__(layers=[_SlotLayer(self, index) for index in range(layers)])
        shape = (layers, slots, text.num_key_value_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.mask = torch.zeros((slots, capacity), dtype=torch.long, device=device)
        self.rows = self.start = self.end = 0
        self.static_rows: int | None = None
        """Set during a fixed-shape decode step: its row count; writes go to column ``write_at``."""
        self.write_at = torch.zeros(1, dtype=torch.long, device=device)
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)
        """The token each row feeds next."""
        self.positions = torch.zeros((4, slots), dtype=torch.long, device=device)
        """The (text, t, h, w) position of that token."""
        self.counts = torch.zeros(slots, dtype=torch.long, device=device)
        """Tokens each row has generated (the one it feeds next included)."""
        self.output_rows = torch.zeros(slots, dtype=torch.long, device=device)
        """The stream's output row of each row."""
        self.history = torch.full((slots, max_new_tokens), -1, dtype=torch.long, device=device)
        """The tokens each row generated, -1 after its last."""
        self.token_ids = torch.zeros((slots, capacity), dtype=torch.long, device=device) if penalize else None
        """The id at each column of each row (outside a row's tokens, the row's own ids): the set the
        repetition penalty applies to (None: no penalty)."""
        self.step: Any = None
        """The fixed-shape decode step (and its CUDA graphs) made for this cache, kept with it for reuse."""

    @property
    def slots(self) -> int:
        return int(self.mask.shape[0])

    @property
    def size(self) -> int:
        """Rows in the batch (the stream's view of a running batch)."""
        return self.rows

    def output_rows_list(self) -> list[int]:
        return [int(row) for row in self.output_rows[: self.rows].tolist()]

    def clear(self) -> None:
        """Forget every row (the buffers stay allocated, in place)."""
        self.mask.zero_()
        self.rows = self.start = self.end = 0

    @property
    def capacity(self) -> int:
        return int(self.mask.shape[1])

    @property
    def used_mask(self) -> torch.Tensor:
        """The running rows' mask over the columns in use (a view)."""
        return self.mask[: self.rows, self.start : self.end]

    def attention_mask(self, query_length: int = 1) -> torch.Tensor:
        """The running rows' mask over the used columns plus ``query_length`` new ones (marked as real)."""
        self.mask[: self.rows, self.end : self.end + query_length] = 1
        return self.mask[: self.rows, self.start : self.end + query_length]

    def advance(self, columns: int = 1) -> None:
        """After a forward pass wrote ``columns`` new columns for every row."""
        self.end += columns

    def reserve(self, columns: int) -> None:
        """Make room for ``columns`` more columns, moving the used ones to the left once if needed."""
        if self.end + columns <= self.capacity:
            return
        if self.end - self.start + columns > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} columns; {self.end - self.start + columns} are needed")
        self._move(0)

    def ensure_columns(self, columns: int) -> None:
        """Grow the buffers (copying the used columns to the left) if fewer than ``columns`` fit. Every new
        buffer is made before any replaces an old one: running out of memory here leaves the cache whole."""
        if columns <= self.capacity:
            return
        capacity = round_columns(max(columns, self.capacity + self.capacity // 2))
        width, rows, used = self.end - self.start, self.rows, slice(self.start, self.end)
        keys = self.keys.new_zeros((*self.keys.shape[:3], capacity, self.keys.shape[4]))
        values = self.values.new_zeros(keys.shape)
        mask = self.mask.new_zeros((self.mask.shape[0], capacity))
        ids = None if self.token_ids is None else self.token_ids[:, :1].expand(-1, capacity).clone()
        keys[:, :rows, :, :width], values[:, :rows, :, :width] = (
            self.keys[:, :rows, :, used],
            self.values[:, :rows, :, used],
        )
        mask[:rows, :width] = self.mask[:rows, used]
        if ids is not None and self.token_ids is not None:  # each row's own id fills the new columns
            ids[:rows, :width] = self.token_ids[:rows, used]
        self.keys, self.values, self.mask, self.token_ids = keys, values, mask, ids
        self.start, self.end = 0, width

    def admit(self, newcomers: Any) -> None:
        """Copy newcomers (``rows.DynamicRows``: a prefill cache of ``n`` rows and width ``w``, and their
        state) into the next free slots, right-aligned at ``end``; columns left of their prompts are masked."""
        count, width = newcomers.attention_mask.shape
        if self.rows == 0:
            self.start = self.end = 0
        if width > self.end:
            self._move(width - (self.end - self.start))
        self.start = min(self.start, self.end - width)
        new, columns = slice(self.rows, self.rows + count), slice(self.end - width, self.end)
        for index, layer in enumerate(newcomers.cache.layers):
            self.keys[index, new, :, columns] = layer.keys
            self.values[index, new, :, columns] = layer.values
        self.mask[new] = 0
        self.mask[new, columns] = newcomers.attention_mask
        self.tokens[new], self.positions[:, new] = newcomers.tokens, newcomers.positions
        self.counts[new], self.output_rows[new] = newcomers.counts, newcomers.output_rows
        self.history[new] = newcomers.history
        if self.token_ids is not None and newcomers.token_ids is not None:
            self.token_ids[new] = newcomers.token_ids[:, :1]  # the row's own id everywhere, then its prompt
            self.token_ids[new, columns] = newcomers.token_ids
        self.rows += count

    def _move(self, new_start: int) -> None:
        """Move the used columns of the running rows to begin at ``new_start``."""
        width = self.end - self.start
        if width + new_start > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} columns; {width + new_start} are needed")
        used, target = slice(self.start, self.end), slice(new_start, new_start + width)
        for buffer in (self.keys, self.values):
            buffer[:, : self.rows, :, target] = buffer[:, : self.rows, :, used].clone()
        if self.token_ids is not None:  # (the columns left behind keep ids of the same rows)
            self.token_ids[: self.rows, target] = self.token_ids[: self.rows, used].clone()
        kept = self.mask[: self.rows, used].clone()
        self.mask[: self.rows] = 0
        self.mask[: self.rows, target] = kept
        self.start, self.end = new_start, new_start + width

    def compact(self, keep: Sequence[int]) -> None:
        """Keep the rows at positions ``keep`` (ascending): each finished row's slot takes one of the last kept
        rows, whose keys, values, mask and state move with it (kept rows may change order)."""
        count = len(keep)
        kept = set(keep)
        holes = [slot for slot in range(count) if slot not in kept]
        donors = [slot for slot in keep if slot >= count]
        if holes:
            device = self.mask.device
            into, take = torch.tensor(holes, device=device), torch.tensor(donors, device=device)
            used = slice(self.start, self.end)
            for buffer in (self.keys, self.values):
                buffer[:, into, :, used] = buffer[:, take, :, used]
            for buffer in self._row_state():
                buffer[into] = buffer[take]
            self.positions[:, into] = self.positions[:, take]
        self.mask[count : self.rows] = 0
        self.rows = count
        in_use = self.mask[:count, self.start : self.end].any(dim=0)
        self.start += int(in_use.int().argmax()) if bool(in_use.any()) else self.end - self.start

    def _row_state(self) -> list[torch.Tensor]:
        """The per-slot buffers indexed by slot first (the positions are indexed by slot second)."""
        state = [self.mask, self.tokens, self.counts, self.output_rows, self.history]
        return state if self.token_ids is None else [*state, self.token_ids]


def round_columns(columns: int) -> int:
    return -(-columns // COLUMN_ROUNDING) * COLUMN_ROUNDING
