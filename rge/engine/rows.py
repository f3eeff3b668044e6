"""The state of rows being decoded together in a ``DynamicCache``: their cache, mask, positions, next tokens,
the tokens generated so far and the ids the repetition penalty reads.

Rows are identified by their output row (the stream's row for the query). ``DynamicRows`` is what a
prefill gives every cache kind (the newcomers), and the running batch of the dynamic kind; the slot kinds
copy it into a ``SlotCache``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class DynamicRows:
    """Rows decoded together in a ``DynamicCache``, and their state."""

    cache: Any
    attention_mask: torch.Tensor  # (R, T)
    positions: torch.Tensor  # (4, R): positions of the token each row feeds next
    tokens: torch.Tensor  # (R,): the token each row feeds next
    output_rows: torch.Tensor  # (R,)
    counts: torch.Tensor  # (R,): tokens generated so far (the next one included)
    history: torch.Tensor  # (R, max_new_tokens): tokens generated, -1 after the last
    token_ids: torch.Tensor | None  # (R, T): ids in each row, for the repetition penalty (None: no penalty)

    @property
    def size(self) -> int:
        return int(self.output_rows.shape[0])

    def output_rows_list(self) -> list[int]:
        return [int(row) for row in self.output_rows.tolist()]

    def keep(self, positions: Sequence[int]) -> None:
        """Keep only the rows at ``positions``, in that order; columns no row uses any more are dropped."""
        keep = torch.tensor(list(positions), device=self.tokens.device)
        self.cache.batch_select_indices(keep)
        self.attention_mask = self.attention_mask[keep]
        self.positions, self.tokens = self.positions[:, keep], self.tokens[keep]
        self.output_rows, self.counts, self.history = self.output_rows[keep], self.counts[keep], self.history[keep]
        self.token_ids = None if self.token_ids is None else self.token_ids[keep]
        used = self.attention_mask.any(dim=0)
        first_used = int(used.int().argmax())
        if first_used:
            self.attention_mask = self.attention_mask[:, first_used:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, first_used:]
                layer.values = layer.values[:, :, first_used:]

    def append(self, other: DynamicRows) -> None:
        """Add ``other``'s rows after these; the narrower cache is left-padded (masked) to the wider."""
        width = max(self.attention_mask.shape[1], other.attention_mask.shape[1])

        def left_pad(tensor: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - tensor.shape[dim]
            return F.pad(tensor, [0, 0] * (tensor.ndim - 1 - dim) + [missing, 0]) if missing else tensor

        for old, new in zip(self.cache.layers, other.cache.layers):
            old.keys = torch.cat([left_pad(old.keys, 2), left_pad(new.keys, 2)])
            old.values = torch.cat([left_pad(old.values, 2), left_pad(new.values, 2)])
        self.attention_mask = torch.cat([left_pad(self.attention_mask, 1), left_pad(other.attention_mask, 1)])
        self.positions = torch.cat([self.positions, other.positions], dim=1)
        self.tokens = torch.cat([self.tokens, other.tokens])
        self.output_rows = torch.cat([self.output_rows, other.output_rows])
        self.counts, self.history = torch.cat([self.counts, other.counts]), torch.cat([self.history, other.history])
        if self.token_ids is not None and other.token_ids is not None:
            width = max(self.token_ids.shape[1], other.token_ids.shape[1])
            self.token_ids = torch.cat([pad_ids(self.token_ids, width), pad_ids(other.token_ids, width)])


def pad_ids(token_ids: torch.Tensor, width: int) -> torch.Tensor:
    """Rows' ids left-padded to ``width`` with each row's own first id (the penalty reads them as a set)."""
    return torch.cat([token_ids[:, :1].expand(-1, width - token_ids.shape[1]), token_ids], dim=1)
