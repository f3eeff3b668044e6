"""The state of a running decode batch and the operations on it: keeping rows, merging newcomers.

Rows are identified by ``indices``: the output row each one writes its embedding and tokens to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .batching import TokenizedItem


@dataclass
class Outputs:
    """Where rows write: embeddings and generated tokens (-1 where none), by output row (a row's index)."""

    embeddings: torch.Tensor  # (N, D) float32
    tokens: torch.Tensor  # (N, max_new_tokens)

    @classmethod
    def allocate(cls, rows: int, hidden_size: int, max_new_tokens: int, device: torch.device) -> Outputs:
        return cls(
            embeddings=torch.empty((rows, hidden_size), dtype=torch.float32, device=device),
            tokens=torch.full((rows, max_new_tokens), -1, dtype=torch.long, device=device),
        )


@dataclass
class Running:
    """The rows being decoded together and their shared state."""

    cache: Any
    attention_mask: torch.Tensor  # (R, T)
    next_positions: torch.Tensor  # (4, R): positions of the token each row feeds next
    next_tokens: torch.Tensor  # (R,): the token each row feeds next
    indices: torch.Tensor  # (R,): output row of each row
    counts: torch.Tensor  # (R,): tokens generated so far (next_tokens included)
    token_ids: torch.Tensor | None  # (R, T): ids in each row, for the repetition penalty (None: no penalty)

    @property
    def size(self) -> int:
        return int(self.indices.shape[0])

    def take_rows(self, rows: torch.Tensor) -> None:
        """Keep the row state (not the cache or mask) of positions ``rows``, in that order."""
        self.next_positions = self.next_positions[:, rows]
        self.next_tokens = self.next_tokens[rows]
        self.indices = self.indices[rows]
        self.counts = self.counts[rows]
        if self.token_ids is not None:
            self.token_ids = self.token_ids[rows]

    def row_state_with(self, other: Running) -> dict[str, Any]:
        """The row state (not the cache or mask) of these rows followed by ``other``'s."""
        return {
            "next_positions": torch.cat([self.next_positions, other.next_positions], dim=1),
            "next_tokens": torch.cat([self.next_tokens, other.next_tokens]),
            "indices": torch.cat([self.indices, other.indices]),
            "counts": torch.cat([self.counts, other.counts]),
            "token_ids": merge_token_ids(self.token_ids, other.token_ids),
        }


def length_groups(rows: Sequence[TokenizedItem], max_padding: float) -> list[list[TokenizedItem]]:
    """Split longest-first ``rows`` into runs whose left padding stays within ``max_padding`` of their tokens."""
    groups: list[list[TokenizedItem]] = []
    for row in rows:
        group = groups[-1] if groups else None
        if group is not None and sum(map(len, group)) + len(row) >= (1 - max_padding) * len(group[0]) * (
            len(group) + 1
        ):
            group.append(row)
        else:
            groups.append([row])
    return groups


def longest_first(item: TokenizedItem) -> tuple[int, int]:
    return (-len(item), item.index)


def select_rows(running: Running, keep: torch.Tensor) -> None:
    """Keep only rows ``keep`` in the cache and row state; trim columns that are padding for all rows."""
    running.cache.batch_select_indices(keep)
    running.attention_mask = running.attention_mask[keep]
    running.take_rows(keep)
    first_used = int(running.attention_mask.any(dim=0).int().argmax())
    if first_used:
        running.attention_mask = running.attention_mask[:, first_used:]
        for layer in running.cache.layers:
            layer.keys = layer.keys[:, :, first_used:]
            layer.values = layer.values[:, :, first_used:]


def merge(running: Running | None, newcomers: Running) -> Running:
    """One batch from two: the shorter cache is left-padded (masked) to the longer one's width."""
    if running is None:
        return newcomers
    width = max(running.attention_mask.shape[1], newcomers.attention_mask.shape[1])

    def left_pad(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - tensor.shape[dim]
        if not missing:
            return tensor
        pad = [0, 0] * (tensor.ndim - 1 - dim) + [missing, 0]
        return F.pad(tensor, pad)

    for old, new in zip(running.cache.layers, newcomers.cache.layers):
        old.keys = torch.cat([left_pad(old.keys, 2), left_pad(new.keys, 2)])
        old.values = torch.cat([left_pad(old.values, 2), left_pad(new.values, 2)])
    return Running(
        cache=running.cache,
        attention_mask=torch.cat([left_pad(running.attention_mask, 1), left_pad(newcomers.attention_mask, 1)]),
        **running.row_state_with(newcomers),
    )


def merge_token_ids(old: torch.Tensor | None, new: torch.Tensor | None) -> torch.Tensor | None:
    """Rows' ids of two batches in one tensor; a shorter row is left-padded with its own first id."""
    if old is None or new is None:
        return None
    width = max(old.shape[1], new.shape[1])
    padded = [torch.cat([ids[:, :1].expand(-1, width - ids.shape[1]), ids], dim=1) for ids in (old, new)]
    return torch.cat(padded)
