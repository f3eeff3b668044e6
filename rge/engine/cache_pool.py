"""Keeps the last decode's ``SlotCache`` (and its captured CUDA graphs) for the next one.

Capturing a decode step as a CUDA graph costs a few eager steps per batch-size bucket; a cache made anew
for every ``encode_query`` call would pay that again each time. The pool hands its cache to one decode
at a time (``take``) and takes it back when that decode's batch empties (``give_back``). It holds one
cache at most: one that does not fit the next request is freed before a new one is made. A cache fits
when it has the slots asked for (rounded up to a bucket) and between the columns needed and twice as
many (sdpa's fixed-shape steps attend over the whole capacity, so a far larger cache costs time).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from .kv_cache import SlotCache
from .static_step import StaticDecodeStep, bucket_for

COLUMN_ROUNDING = 128


class SlotCachePool:
    """At most one idle ``SlotCache`` with the fixed-shape step that belongs to it; thread-safe."""

    def __init__(self) -> None:
        self._idle: tuple[SlotCache, StaticDecodeStep | None] | None = None
        self._lock = threading.Lock()

    def take(
        self, model: Any, slots: int, columns: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[SlotCache, StaticDecodeStep | None]:
        """An empty cache of ``bucket_for(slots)`` slots and at least ``columns`` columns, with its step
        (None until the decoder makes one)."""
        slots = bucket_for(slots, 1 << 30)
        with self._lock:
            idle, self._idle = self._idle, None
        if idle is not None and _fits(idle[0], slots, columns, dtype, device):
            idle[0].clear()
            return idle
        del idle  # freed before the new buffers are allocated
        capacity = -(-columns // COLUMN_ROUNDING) * COLUMN_ROUNDING
        return SlotCache(model.config, slots, capacity, dtype, device), None

    def give_back(self, cache: SlotCache, step: StaticDecodeStep | None) -> None:
        """Keep ``cache`` (emptied by its decode) for the next ``take``, in place of any idle one."""
        with self._lock:
            self._idle = (cache, step)

    def clear(self) -> None:
        """Free the idle cache and its graphs."""
        with self._lock:
            self._idle = None


def _fits(cache: SlotCache, slots: int, columns: int, dtype: torch.dtype, device: torch.device) -> bool:
    return (
        cache.mask.shape[0] == slots
        and columns <= cache.capacity <= 2 * max(columns, COLUMN_ROUNDING)
        and cache.keys.dtype == dtype
        and cache.keys.device == device
    )
