"""Fixed-shape decode steps over a ``SlotCache``, replayed as CUDA graphs on CUDA.

A graph replays the same kernels on the same addresses, so everything a decode step reads must be a
tensor that stays in place and keeps its shape: the running rows are padded to a bucket size (1, 2, 4,
8, 16, 32, 48, 64, 96, 128, ...), the step attends over the cache's whole capacity with a 4-D mask read
from the cache's mask buffer (unused columns masked), the new keys and values are written at a column
held in a tensor (``SlotCache.write_at``), and the token ids and positions come from buffers filled
before the step. Padded rows attend to their own new column only and their outputs are dropped.

The step runs eagerly everywhere (the reference, and what CPU tests check token for token); on CUDA each
(bucket, capacity) is captured once as a CUDA graph, after a warm-up on a side stream, and replayed. If
a capture fails, a warning says so and the step stays eager.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .kv_cache import SlotCache

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)


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
        self.graphs = graphs and device.type == "cuda"
        self._captured: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
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
        mask = cache.mask[:bucket].bool()[:, None, None, :]
        cache.static_rows = bucket
        try:
            outputs = self.language_model(
                input_ids=self.token_ids[:bucket],
                attention_mask=mask,
                position_ids=self.positions[:, :bucket],
                past_key_values=cache,
                use_cache=True,
            )
        finally:
            cache.static_rows = None
        return outputs.last_hidden_state[:, -1]  # type: ignore[no-any-return]

    def _replay(self, bucket: int) -> torch.Tensor:
        key = (bucket, self.cache.capacity, self.cache.keys.data_ptr())  # a grown cache needs new graphs
        if key not in self._captured:
            try:
                self._captured[key] = self._capture(bucket)
            except RuntimeError as error:
                warnings.warn(f"CUDA graph capture failed ({error}); decoding eagerly", RuntimeWarning, stacklevel=3)
                self.graphs = False
                return self._forward(bucket)
        graph, output = self._captured[key]
        graph.replay()
        return output

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
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
        return graph, output
