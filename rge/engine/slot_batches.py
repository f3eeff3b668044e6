"""Running batches kept in a ``SlotCache``: the same tokens as the dynamic kind, no per-step copies.

Prefill is the dynamic kind's (each admitted group is prefilled into its own cache); the group is then
copied into free slots of the running cache, state included. Decode steps write in place; finished rows
are compacted by moving only as many rows as finished. Caches come from a ``SlotCachePool`` and go back to
it when the batch empties, so the next decode reuses the buffers (and, with fixed-shape steps, the
captured graphs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .batches import (
    DynamicBatches,
    FinishedRow,
    Prefiller,
    advance,
    choose_next,
)
from .batching import ModelBatch, TokenizedItem
from .cache_pool import SlotCachePool
from .decode_attention import step_mask
from .decode_config import DecodeConfig, TokenChoice
from .kv_cache import SlotCache
from .rows import DynamicRows
from .static_step import StaticDecodeStep


class SlotBatches(Prefiller):
    """The running batch is a ``SlotCache`` of as many slots as rows run together (rounded up to a bucket),
    taken from ``pool`` (its own when none is given); eager decode steps."""

    def __init__(
        self,
        model: Any,
        make_batch: Callable[[Sequence[TokenizedItem]], ModelBatch],
        config: DecodeConfig,
        choice: TokenChoice,
        pool: SlotCachePool | None = None,
    ) -> None:
        super().__init__(model, make_batch, config, choice)
        self.pool = pool or SlotCachePool()

    def merge(self, running: SlotCache | None, newcomers: DynamicRows, slots: int) -> SlotCache:
        width = int(newcomers.attention_mask.shape[1])
        if running is None:
            parameter = next(self.model.parameters())
            cache = self.pool.take(self.model, slots, width + 2 * self.config.max_new_tokens, parameter.dtype,
                                   parameter.device, max_new_tokens=self.config.max_new_tokens,
                                   penalize=self.config.penalizes)  # fmt: skip
        else:
            cache = running
            cache.ensure_columns(width + self.config.max_new_tokens + 1)
        cache.admit(newcomers)
        return cache

    def step(self, cache: SlotCache) -> tuple[SlotCache | None, list[FinishedRow]]:
        return self.conclude(cache, *self._step(cache))

    def keep(self, cache: SlotCache, positions: Sequence[int]) -> SlotCache | None:
        if not positions:
            return None
        cache.compact(positions)
        return cache

    def release(self, cache: SlotCache) -> None:
        self.pool.give_back(cache)

    def _step(self, cache: SlotCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """An eager step: the rows' hidden states, which finished, whether top-p held (when asked)."""
        rows = cache.rows
        cache.reserve(1)
        if cache.token_ids is not None:  # the fed token joins the ids the penalty applies to, at its column
            cache.token_ids[:rows, cache.end] = cache.tokens[:rows]
        hidden = self.model.model(
            input_ids=cache.tokens[:rows, None],
            attention_mask=step_mask(cache.attention_mask(1), self.model.model.language_model),
            position_ids=cache.positions[:, :rows, None],
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state[:, -1]
        cache.advance(1)
        ids = None if cache.token_ids is None else cache.token_ids[:rows]
        done, chosen, holds = choose_next(self.scores, hidden, cache.tokens[:rows], cache.counts[:rows],
                                          cache.output_rows[:rows], ids, self.config, self.choice)  # fmt: skip
        advance(chosen, done, cache.tokens[:rows], cache.counts[:rows], cache.positions[:, :rows],
                cache.history[:rows])  # fmt: skip
        return hidden, done, holds


class StaticSlotBatches(SlotBatches):
    """``SlotBatches`` whose decode steps have fixed shapes (``static_step.py``): CUDA graphs on CUDA, the
    same steps run eagerly elsewhere. A cache keeps its step (and graphs) for the next decode."""

    def _step(self, cache: SlotCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if cache.step is None or not cache.step.serves(self.config, self.choice):
            cache.step = StaticDecodeStep(self.model, cache, self.config, self.choice)
        return cache.step(cache)  # type: ignore[no-any-return]


BATCHES: dict[str, type[Prefiller]] = {
    "dynamic": DynamicBatches,
    "preallocated": SlotBatches,
    "static": StaticSlotBatches,
}
"""The query path's KV-cache kinds: transformers' ``DynamicCache``, a ``SlotCache`` with eager steps, a
``SlotCache`` with fixed-shape steps (CUDA graphs on CUDA)."""


def resolve_kv_cache(kv_cache: str, device: torch.device) -> str:
    """``"auto"`` is ``"static"`` on CUDA (graph-captured steps) and ``"dynamic"`` elsewhere (on CPU the
    fixed-shape steps cost more than they save: docs/performance.md)."""
    if kv_cache != "auto":
        return kv_cache
    return "static" if device.type == "cuda" else "dynamic"
