"""Keeps the last decode's ``SlotCache`` (and the captured CUDA graphs of its step) for the next one.

Capturing a decode step as a CUDA graph costs a few eager steps per batch-size bucket; a cache made anew
for every ``encode_query`` call would pay that again each time. The pool hands its cache to one decode
at a time (``take``) and takes it back when that decode's batch empties (``give_back``). It holds one
cache at most: one that does not fit the next request is freed before a new one is made (the cache's
layers hold it weakly, so dropping the last reference frees its buffers at once). A cache fits when it
has at least the slots asked for, the same history size and penalty, and between the columns needed and
twice as many (sdpa's fixed-shape steps attend over the whole capacity, so a far larger cache costs
time). Captured graphs hold the model's weights by address: after changing the weights in place (a
merge, ``model.to(...)``), call ``RGEEncoder.release_decode_cache()``.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from .kv_cache import COLUMN_ROUNDING, SlotCache, bucket_for, round_columns


class SlotCachePool:
    """At most one idle ``SlotCache`` (with the fixed-shape step it holds); thread-safe."""

    def __init__(self) -> None:
        self._idle: SlotCache | None = None
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[type[SlotCachePool], tuple[()]]:
        """Pickled as a new, empty pool: a cache and its graphs belong to the process that made them."""
        return type(self), ()

    def take(
        self,
        model: Any,
        slots: int,
        columns: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        max_new_tokens: int,
        penalize: bool,
    ) -> SlotCache:
        """An empty cache of ``bucket_for(slots)`` slots and at least ``columns`` columns."""
        slots = bucket_for(slots, 1 << 30)
        with self._lock:
            idle, self._idle = self._idle, None
        if idle is not None and _fits(idle, slots, columns, dtype, device, max_new_tokens, penalize):
            idle.clear()
            return idle
        del idle  # freed here, before the new buffers are allocated
        return SlotCache(model.config, slots, round_columns(columns), dtype, device, max_new_tokens=max_new_tokens,
                         penalize=penalize)  # fmt: skip

    def give_back(self, cache: SlotCache) -> None:
        """Keep ``cache`` (emptied by its decode) for the next ``take``, in place of any idle one."""
        with self._lock:
            self._idle = cache

    def clear(self) -> None:
        """Free the idle cache and its graphs."""
        with self._lock:
            self._idle = None

    @property
    def idle(self) -> SlotCache | None:
        """The cache kept for the next decode, if any."""
        return self._idle


def _fits(
    cache: SlotCache,
    slots: int,
    columns: int,
    dtype: torch.dtype,
    device: torch.device,
    max_new_tokens: int,
    penalize: bool,
) -> bool:
    return (
        cache.slots >= slots  # steps run a bucket of the rows, not of the slots: a larger cache costs no time
        and columns <= cache.capacity <= 2 * max(columns, COLUMN_ROUNDING)
        and cache.keys.dtype == dtype
        and cache.keys.device == device
        and cache.history.shape[1] == max_new_tokens
        and (cache.token_ids is not None) == penalize
    )
