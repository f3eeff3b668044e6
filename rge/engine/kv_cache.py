"""A preallocated KV cache for the decode loop: appends, compaction and admission without reallocation.

transformers' ``DynamicCache`` concatenates every layer's keys and values at each step (a copy of the
whole cache) and ``batch_select_indices`` copies every kept row when a row finishes. ``SlotCache`` holds
one buffer per K and V, ``[layers, slots, kv_heads, capacity, head_dim]``, and a mask ``[slots, capacity]``:

- the running rows are slots ``0..rows-1``; the columns in use are ``start..end`` (one write pointer for
  all rows, which are left-padded and masked, as in any batch);
- a decode step writes one column in place and attends to a view of the buffer;
- a finished row's slot is refilled by moving one of the last rows into it (only finished-row count of
  rows move, never the whole cache), and columns no row uses any more are dropped by moving ``start``;
- admitted queries' prefill caches are copied into free slots, right-aligned at ``end``;
- when ``end`` reaches the capacity, the used columns move back to the left once (rare: the capacity
  leaves room for the longest prompt plus the reasoning budget twice over);
- a newcomer longer than the capacity allows (a server's queries arrive in any order) makes the buffers
  grow once, by at least half.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer


class _SlotLayer(DynamicLayer):
    """One layer's view of the shared buffers, as transformers' attention layers call it."""

    def __init__(self, cache: SlotCache, index: int) -> None:
        super().__init__()
        self.cache, self.index, self.is_initialized = cache, index, True

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
    """Preallocated keys and values for up to ``slots`` rows and ``capacity`` columns; see the module."""

    def __init__(self, config: Any, slots: int, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
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

    def clear(self) -> None:
        """Forget every row (the buffers stay allocated, in place)."""
        self.mask.zero_()
        self.rows = self.start = self.end = 0

    @property
    def capacity(self) -> int:
        return int(self.mask.shape[1])

    @property
    def free_slots(self) -> int:
        return int(self.mask.shape[0]) - self.rows

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
        """Grow the buffers (copying the used columns to the left) if fewer than ``columns`` fit."""
        if columns <= self.capacity:
            return
        capacity = max(columns, self.capacity + self.capacity // 2)
        width, used = self.end - self.start, slice(self.start, self.end)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:3], capacity, old.shape[4]))
            new[:, : self.rows, :, :width] = old[:, : self.rows, :, used]
            setattr(self, name, new)
        mask = self.mask.new_zeros((self.mask.shape[0], capacity))
        mask[: self.rows, :width] = self.mask[: self.rows, used]
        self.mask, self.start, self.end = mask, 0, width

    def admit(self, prefill: Any, attention_mask: torch.Tensor) -> None:
        """Copy newcomers' prefill (a ``DynamicCache`` of ``n`` rows and width ``w``) into the next free slots,
        right-aligned at ``end``; columns left of their prompts are masked."""
        count, width = attention_mask.shape
        if self.rows == 0:
            self.start = self.end = 0
        if width > self.end:
            self._move(width - (self.end - self.start))
        self.start = min(self.start, self.end - width)
        new, columns = slice(self.rows, self.rows + count), slice(self.end - width, self.end)
        for index, layer in enumerate(prefill.layers):
            self.keys[index, new, :, columns] = layer.keys
            self.values[index, new, :, columns] = layer.values
        self.mask[new] = 0
        self.mask[new, columns] = attention_mask
        self.rows += count

    def _move(self, new_start: int) -> None:
        """Move the used columns of the running rows to begin at ``new_start``."""
        width = self.end - self.start
        if width + new_start > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} columns; {width + new_start} are needed")
        used, target = slice(self.start, self.end), slice(new_start, new_start + width)
        for buffer in (self.keys, self.values):
            buffer[:, : self.rows, :, target] = buffer[:, : self.rows, :, used].clone()
        kept = self.mask[: self.rows, used].clone()
        self.mask[: self.rows] = 0
        self.mask[: self.rows, target] = kept
        self.start, self.end = new_start, new_start + width

    def compact(self, keep: torch.Tensor) -> torch.Tensor:
        """Keep the rows at positions ``keep`` (sorted): each finished row's slot takes one of the last kept
        rows. Returns the new order of the kept rows, as positions before compaction, for the row state."""
        count = int(keep.shape[0])
        order = torch.arange(count, device=keep.device)
        kept = torch.zeros(self.rows, dtype=torch.bool, device=keep.device)
        kept[keep] = True
        holes = (~kept[:count]).nonzero().squeeze(1)
        donors = keep[keep >= count]
        if holes.numel():
            used = slice(self.start, self.end)
            for buffer in (self.keys, self.values):
                buffer[:, holes, :, used] = buffer[:, donors, :, used]
            self.mask[holes] = self.mask[donors]
            order[holes] = donors
        self.mask[count : self.rows] = 0
        self.rows = count
        in_use = self.mask[:count, self.start : self.end].any(dim=0)
        self.start += int(in_use.int().argmax()) if bool(in_use.any()) else self.end - self.start
        return order
