"""Prepared items -> left-padded model batches, formed by length: batches of a fixed size
(``length_sorted_batches``) or, for a decode's prefill, groups whose padding stays within a bound
(``length_groups``).

Items arrive with their prompt ids already expanded (one id per visual token) and their image already
resized (``rge.vision.PreparedImage``); building a batch only pads ids and concatenates patches that a
worker usually computed ahead of time, so the thread that runs the model does no image work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch

IMAGE_TOKEN_TYPE = 1


class ImagePatches(Protocol):
    """What a batch needs of an item's image (``rge.vision.PreparedImage`` is one)."""

    grid: tuple[int, int, int]
    tokens: int

    def ready(self) -> bool:
        """Whether the patches are computed (taking them will not wait)."""
        ...

    def take_pixel_values(self) -> torch.Tensor:
        """The image's patches (computed now if they were not prefetched)."""
        ...


@dataclass(frozen=True)
class TokenizedItem:
    """An item's prompt as token ids, the image slot already expanded to one id per visual token."""

    index: int
    input_ids: list[int]
    image: ImagePatches | None

    def __len__(self) -> int:
        return len(self.input_ids)

    def ready(self) -> bool:
        """Whether a batch can be built from this item without waiting for image work."""
        return self.image is None or self.image.ready()


@dataclass
class ModelBatch:
    """Left-padded tensors for one forward pass of Qwen2.5-VL."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None

    def to(self, device: torch.device, dtype: torch.dtype) -> ModelBatch:
        """Move to ``device``; pixel values also take the model's ``dtype``."""
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            mm_token_type_ids=self.mm_token_type_ids.to(device),
            pixel_values=None if self.pixel_values is None else self.pixel_values.to(device, dtype),
            image_grid_thw=None if self.image_grid_thw is None else self.image_grid_thw.to(device),
        )


def longest_first(item: TokenizedItem) -> tuple[int, int]:
    """Sort key: the longest prompt first, ties in input order, so neighbours have similar lengths."""
    return (-len(item), item.index)


def length_sorted_batches(items: Sequence[TokenizedItem], batch_size: int) -> list[list[TokenizedItem]]:
    """Longest first, so that rows of a batch have similar lengths and padding stays small."""
    ordered = sorted(items, key=longest_first)
    return [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]


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


def collate(
    items: Sequence[TokenizedItem],
    pad_id: int,
    image_pad_id: int,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> ModelBatch:
    """Left-pad ``items`` into one batch. Each image's patches go to ``device`` (in ``dtype``) on their own,
    without waiting for the copy when they sit in pinned memory, and are joined there."""
    width = max(len(item) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        input_ids[row, width - len(item) :] = torch.tensor(item.input_ids, dtype=torch.long)
        attention_mask[row, width - len(item) :] = 1
    mm_token_type_ids = (input_ids == image_pad_id).int() * IMAGE_TOKEN_TYPE
    images = [item.image for item in items if item.image is not None]
    if not images:
        return ModelBatch(input_ids, attention_mask, mm_token_type_ids, None, None)
    patches = [image.take_pixel_values() for image in images]
    pixel_values = torch.cat([part.to(device=device, dtype=dtype, non_blocking=part.is_pinned()) for part in patches])
    grid = torch.tensor([image.grid for image in images], dtype=torch.long)
    return ModelBatch(input_ids, attention_mask, mm_token_type_ids, pixel_values, grid)
