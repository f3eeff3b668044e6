"""The reasoning decoder on a preallocated KV cache (``kv_cache.SlotCache``): same tokens, no per-step copies.

Prefill is unchanged (each admitted group is prefilled into its own cache); the group is then copied into
free slots of the running cache. Decode steps write in place; finished rows are compacted by moving only
as many rows as finished. Everything else (token choice, capture, budget, admission policy, out-of-memory
retries) is ``ReasoningDecoder``'s.
"""

from __future__ import annotations

import weakref
from dataclasses import replace
from typing import Any

import torch

from .decoder import ReasoningDecoder
from .kv_cache import SlotCache
from .rows import Running
from .static_step import StaticDecodeStep


class SlotDecoder(ReasoningDecoder):
    """``ReasoningDecoder`` with a ``SlotCache`` of as many slots as rows run together."""

    def _merge(self, running: Running | None, newcomers: Running, slots: int) -> Running:
        width = int(newcomers.attention_mask.shape[1])
        if running is None:
            parameter = next(self.model.parameters())
            cache = SlotCache(self.model.config, slots, width + 2 * self.max_new_tokens,
                              parameter.dtype, parameter.device)  # fmt: skip
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


class StaticSlotDecoder(SlotDecoder):
    """``SlotDecoder`` whose decode steps have fixed shapes (``static_step.py``): CUDA graphs on CUDA,
    the same steps run eagerly elsewhere."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._steps: weakref.WeakKeyDictionary[SlotCache, StaticDecodeStep] = weakref.WeakKeyDictionary()

    def _decode_forward(self, running: Running) -> torch.Tensor:
        cache = running.cache
        step = self._steps.get(cache)
        if step is None:
            step = self._steps[cache] = StaticDecodeStep(self.model, cache, graphs=True)
        hidden = step(running.next_tokens, running.next_positions)
        running.attention_mask = cache.used_mask
        return hidden
