"""The reasoning decoder on a preallocated KV cache (``kv_cache.SlotCache``): same tokens, no per-step copies.

Prefill is unchanged (each admitted group is prefilled into its own cache); the group is then copied into
free slots of the running cache. Decode steps write in place; finished rows are compacted by moving only
as many rows as finished. Everything else (token choice, capture, budget, admission policy, out-of-memory
retries) is ``ReasoningDecoder``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from .batching import TokenizedItem
from .decoder import DecodeResult, ReasoningDecoder, _Running
from .kv_cache import SlotCache


class SlotDecoder(ReasoningDecoder):
    """``ReasoningDecoder`` with a ``SlotCache`` of ``batch_size`` slots (fewer when there are fewer items)."""

    def run(self, items: Sequence[TokenizedItem], progress: bool = False) -> DecodeResult:
        self._slots = max(1, min(self.batch_size, len(items)))
        return super().run(items, progress)

    def _merge(self, running: _Running | None, newcomers: _Running) -> _Running:
        if running is None:
            width = int(newcomers.attention_mask.shape[1])
            parameter = next(self.model.parameters())
            cache = SlotCache(self.model.config, self._slots, width + 2 * self.max_new_tokens,
                              parameter.dtype, parameter.device)  # fmt: skip
        else:
            cache = running.cache
        cache.admit(newcomers.cache, newcomers.attention_mask)
        if running is None:
            return replace(newcomers, cache=cache, attention_mask=cache.used_mask)
        return _Running(cache=cache, attention_mask=cache.used_mask, **running.row_state_with(newcomers))

    def _decode_forward(self, running: _Running) -> torch.Tensor:
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

    def _select_rows(self, running: _Running, keep: torch.Tensor) -> torch.Tensor:
        cache = running.cache
        order = cache.compact(keep)
        running.attention_mask = cache.used_mask
        running.take_rows(order)
        return order
