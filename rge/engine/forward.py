"""Forward passes of Qwen2.5-VL as ``generate`` runs them: explicit 3-D M-RoPE positions, inner model only.

Passing explicit ``position_ids`` ((4, B, L): text positions, then t/h/w) means the model never reads
its cached ``rope_deltas``, which go stale between calls of different batch sizes.
"""

from __future__ import annotations

from typing import Any

import torch

from .batching import ModelBatch


def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (pads get 0), as ``generate`` builds them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def build_position_ids(model: Any, batch: ModelBatch) -> torch.Tensor:
    """The (4, B, L) position ids ``generate`` uses at prefill for ``batch``."""
    text = text_positions(batch.attention_mask)
    if batch.image_grid_thw is None:
        vision = text.unsqueeze(0).expand(3, -1, -1)
    else:
        vision, _ = model.model.get_rope_index(
            batch.input_ids,
            mm_token_type_ids=batch.mm_token_type_ids,
            image_grid_thw=batch.image_grid_thw,
            attention_mask=batch.attention_mask,
        )
    return torch.cat([text.unsqueeze(0), vision.to(text.device)], dim=0)


def forward_prompts(
    model: Any, batch: ModelBatch, position_ids: torch.Tensor, cache: Any | None = None
) -> torch.Tensor:
    """Run the inner model on whole prompts; returns the final-norm hidden states (B, L, D).

    With ``cache`` the keys and values are written into it (prefill); without, nothing is cached.
    """
    outputs = model.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids,
        pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw,
        mm_token_type_ids=batch.mm_token_type_ids,
        past_key_values=cache,
        use_cache=cache is not None,
    )
    return outputs.last_hidden_state
