"""The reasoning decoder on a preallocated KV cache (``kv_cache.SlotCache``): same tokens, no per-step copies.

Prefill is unchanged (each admitted group is prefilled into its own cache); the group is then copied into
free slots of the running cache. Decode steps write in place; finished rows are compacted by moving only
as many rows as finished. Everything else (token choice, capture, budget, admission policy, out-of-memory
retries) is ``ReasoningDecoder``'s. Caches come from a ``SlotCachePool`` and go back to it when the batch
empties, so the next decode reuses the buffers (and, with fixed-shape steps, the captured graphs).
"""

from __future__ import annotations

import weakref
from dataclasses import replace
from typing import Any

import torch

from .cache_pool import SlotCachePool
from .decoder import ReasoningDecoder
from .kv_cache import SlotCache
from .rows import Running
from .static_step import StaticDecodeStep


class SlotDecoder(ReasoningDecoder):
    """``ReasoningDecoder`` with a ``SlotCache`` of as many slots as rows run together (rounded up to a
    bucket), taken from ``pool`` (its own when none is given)."""

    def __init__(self, *args: Any, pool: SlotCachePool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pool = pool or SlotCachePool()
        self._steps: weakref.WeakKeyDictionary[SlotCache, StaticDecodeStep] = weakref.WeakKeyDictionary()

    def _merge(self, running: Running | None, newcomers: Running, slots: int) -> Running:
        width = int(newcomers.attention_mask.shape[1])
        if running is None:
            parameter = next(self.model.parameters())
            cache, step = self.pool.take(self.model, slots, width + 2 * self.max_new_tokens,
                                         parameter.dtype, parameter.device)  # fmt: skip
            if step is not None:
                self._steps[cache] = step
        else:
            cache = running.cache
            cache.ensure_columns(width + self.max_new_tokens + 1)
        cache.admit(newcomers.cache, newcomers.attention_mask)
        if running is None:
            return replace(newcomers, cache=cache, attention_mask=cache.used_mask)
        return Running(cache=cache, attention_mask=cache.used_mask, **running.row_state_with(newcomers))

    def _decode_forward(self, running: Running) -> torch.Tensor:
        cache = running.cache
        cache.reserve(1)
        hidden = self.model.model(
            input_ids=running.next_tokens[:, None],
            attention_mask=cache.attention_mask(1),
            position_ids=running.next_positions[:, :, None],
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state[:, -1]
        cache.advance(1)
        running.attention_mask = cache.used_mask
        return hidden  # type: ignore[no-any-return]

    def _select_rows(self, running: Running, keep: torch.Tensor) -> torch.Tensor:
        cache = running.cache
        order = cache.compact(keep)
        running.attention_mask = cache.used_mask
        running.take_rows(order)
        return order

    def _release(self, running: Running) -> None:
        self.pool.give_back(running.cache, self._steps.get(running.cache))


class StaticSlotDecoder(SlotDecoder):
    """``SlotDecoder`` whose decode steps have fixed shapes (``static_step.py``): CUDA graphs on CUDA,
    the same steps run eagerly elsewhere."""

    def _decode_forward(self, running: Running) -> torch.Tensor:
        cache = running.cache
        step = self._steps.get(cache)
        if step is None:
            step = self._steps[cache] = StaticDecodeStep(self.model, cache, graphs=True)
        hidden = step(running.next_tokens, running.next_positions)
        running.attention_mask = cache.used_mask
        return hidden


DECODERS: dict[str, type[ReasoningDecoder]] = {
    "dynamic": ReasoningDecoder,
    "preallocated": SlotDecoder,
    "static": StaticSlotDecoder,
}
"""The query path's decoders by KV cache: transformers' ``DynamicCache``, a ``SlotCache`` with eager steps,
a ``SlotCache`` with fixed-shape steps (CUDA graphs on CUDA)."""


def resolve_kv_cache(kv_cache: str, device: torch.device) -> str:
    """``"auto"`` is ``"static"`` on CUDA (graph-captured steps) and ``"dynamic"`` elsewhere (on CPU the
    fixed-shape steps cost more than they save: docs/performance.md)."""
    if kv_cache != "auto":
        return kv_cache
    return "static" if device.type == "cuda" else "dynamic"
