"""Fixed-shape decode steps over a ``SlotCache``, replayed as CUDA graphs on CUDA.

A graph replays the same kernels on the same addresses, so everything a decode step reads must be a
tensor that stays in place and keeps its shape: the running rows are padded to a bucket size (1, 2, 4,
8, 16, 32, 48, 64, 96, 128, ...), the step attends over the cache's whole capacity within each row's
window of columns (``decode_attention.py``: as a mask, or flash-attention's KV-cache kernel), the new keys
and values are written at a column held in a tensor (``SlotCache.write_at``), and the token ids and
positions come from buffers filled before the step. Padded rows attend to their own new column only and
their outputs are dropped.

The step runs eagerly everywhere (the reference, and what CPU tests check token for token); on CUDA each
(bucket, capacity) is captured once as a CUDA graph, after a warm-up on a side stream. The first replay
of each graph at a later step is checked against the eager step on the same inputs; if a capture fails
or a replay disagrees, a warning says so and the step stays eager.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from .decode_attention import DecodeWindow, install_flash_dispatch, uses_flash_kernel
from .kv_cache import SlotCache

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
REPLAY_TOLERANCE = 2e-2
"""Largest |replayed - eager| / (1 + |eager|) accepted when a graph's first replay is checked."""


def bucket_for(rows: int, slots: int) -> int:
    """The smallest bucket that holds ``rows`` (never more than the cache's ``slots``)."""
    return min(next((size for size in BUCKETS if size >= rows), rows), slots)


class StaticDecodeStep:
    """One decode forward of the language model on ``cache`` with fixed shapes; see the module."""

    def __init__(self, model: Any, cache: SlotCache, *, graphs: bool) -> None:
        self.language_model = model.model.language_model
        self.cache = cache
        slots, device = cache.mask.shape[0], cache.mask.device
        self.token_ids = torch.zeros((slots, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((4, slots, 1), dtype=torch.long, device=device)
        self.flash = uses_flash_kernel(self.language_model, device, cache.keys.dtype)
        if self.flash:
            install_flash_dispatch(self.language_model.config._attn_implementation)
        self.graphs = graphs and device.type == "cuda"
        self._captured: dict[tuple[int, int, int], tuple[Callable[[], None], torch.Tensor]] = {}
        self._verified: set[tuple[int, int, int]] = set()
        self._pool: Any = None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed each running row its token at its (4,) position; returns the rows' final hidden states."""
        cache, rows = self.cache, int(tokens.shape[0])
        bucket = bucket_for(rows, int(cache.mask.shape[0]))
        cache.reserve(1)
        end = cache.end
        self.token_ids[:rows, 0] = tokens
        self.token_ids[rows:bucket] = 0
        self.positions[:, :rows, 0] = positions
        self.positions[:, rows:bucket] = 0
        cache.mask[rows:bucket] = 0
        cache.mask[:bucket, end] = 1  # padded rows see only their own new column: finite, then dropped
        cache.write_at.fill_(end)
        hidden = self._replay(bucket) if self.graphs else self._forward(bucket)
        cache.mask[rows:bucket, end] = 0
        cache.advance(1)
        return hidden[:rows].clone()

    def _forward(self, bucket: int) -> torch.Tensor:
        cache = self.cache
        window = DecodeWindow.from_mask(cache.mask[:bucket], cache.write_at)
        flash = {"decode_window": window} if self.flash else {}
        cache.static_rows = bucket
        try:
            outputs = self.language_model(
                input_ids=self.token_ids[:bucket],
                attention_mask=window.mask,
                position_ids=self.positions[:, :bucket],
                past_key_values=cache,
                use_cache=True,
                **flash,
            )
        finally:
            cache.static_rows = None
        return outputs.last_hidden_state[:, -1]  # type: ignore[no-any-return]

    def _replay(self, bucket: int) -> torch.Tensor:
        key = (bucket, self.cache.capacity, self.cache.keys.data_ptr())  # a grown cache needs new graphs
        if self._captured and next(iter(self._captured))[2] != key[2]:
            self._captured.clear()  # graphs of buffers the cache has replaced
            self._verified.clear()
        if key not in self._captured:
            try:
                self._captured[key] = self._capture(bucket)
            except RuntimeError as error:
                return self._fall_back(f"CUDA graph capture failed ({error})", bucket)
            return self._forward(bucket)  # this step runs eagerly; the graph's first replay is checked later
        replay, output = self._captured[key]
        if key in self._verified:
            replay()
            return output
        eager = self._forward(bucket).clone()  # writes the same keys and values the replay writes again
        replay()
        difference = float(((output - eager).abs() / (1 + eager.abs())).max())
        if difference > REPLAY_TOLERANCE:
            message = f"a CUDA graph replay differs from the eager step by {difference:.3g}"
            return self._fall_back(message, bucket, eager)
        self._verified.add(key)
        return output

    def _fall_back(self, reason: str, bucket: int, eager: torch.Tensor | None = None) -> torch.Tensor:
        warnings.warn(f"{reason}; decoding eagerly", RuntimeWarning, stacklevel=4)
        self.graphs = False
        self._captured.clear()
        return eager if eager is not None else self._forward(bucket)

    def _capture(self, bucket: int) -> tuple[Callable[[], None], torch.Tensor]:
        """Warm up on a side stream (the writes repeat this step's own), then capture one step."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(bucket)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self._forward(bucket)
        return graph.replay, output
