"""Items -> token ids with expanded image slots -> left-padded model batches, formed by length."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image

from ..images import VisionPreprocessor

IMAGE_TOKEN_TYPE = 1


@dataclass(frozen=True)
class TokenizedItem:
    """An item's prompt as token ids, the image slot already expanded to one id per visual token."""

    index: int
    input_ids: list[int]
    image: Image.Image | None

    def __len__(self) -> int:
        return len(self.input_ids)


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


class Tokenizer:
    """Turns prompt strings into ids, expanding each ``<|image_pad|>`` to the image's token count."""

    def __init__(self, tokenizer: Any, vision: VisionPreprocessor, image_pad_id: int) -> None:
        self.tokenizer = tokenizer
        self.vision = vision
        self.image_pad_id = image_pad_id

    def __call__(self, prompts: Sequence[str], images: Sequence[Image.Image | None]) -> list[TokenizedItem]:
        encoded = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        return [
            TokenizedItem(index, self._expand(ids, image, index), image)
            for index, (ids, image) in enumerate(zip(encoded, images))
        ]

    def _expand(self, ids: list[int], image: Image.Image | None, index: int) -> list[int]:
        if image is None:
            return ids
        slot = ids.index(self.image_pad_id)
        return ids[:slot] + [self.image_pad_id] * self.vision.token_count(image, index) + ids[slot + 1 :]


def length_sorted_batches(items: Sequence[TokenizedItem], batch_size: int) -> list[list[TokenizedItem]]:
    """Longest first, so that rows of a batch have similar lengths and padding stays small."""
    ordered = sorted(items, key=lambda item: (-len(item), item.index))
    return [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]


def collate(items: Sequence[TokenizedItem], pad_id: int, image_pad_id: int, vision: VisionPreprocessor) -> ModelBatch:
    """Left-pad ``items`` into one batch; image patches are computed here, one batch at a time."""
    width = max(len(item) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        input_ids[row, width - len(item) :] = torch.tensor(item.input_ids, dtype=torch.long)
        attention_mask[row, width - len(item) :] = 1
    mm_token_type_ids = (input_ids == image_pad_id).int() * IMAGE_TOKEN_TYPE
    images = [item.image for item in items if item.image is not None]
    pixel_values, grid = vision(images) if images else (None, None)
    return ModelBatch(input_ids, attention_mask, mm_token_type_ids, pixel_values, grid)
