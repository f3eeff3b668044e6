"""The candidate path: prompt + ``<emb>``, one batched forward, the state at ``<emb>``; no logits."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .batching import ModelBatch, TokenizedItem, length_sorted_batches
from .forward import build_position_ids, forward_prompts
from .memory import release_memory
from .pooling import gather_at_token

logger = logging.getLogger("rge.engine")


def embed_candidates(
    model: Any,
    items: Sequence[TokenizedItem],
    make_batch: Callable[[Sequence[TokenizedItem]], ModelBatch],
    emb_token_id: int,
    batch_size: int,
    progress: bool,
    prefetch: Callable[[Sequence[TokenizedItem]], None] | None = None,
) -> torch.Tensor:
    """Embeddings (N, D, float32, not normalised) of ``items`` in their index order.

    Batches are formed longest-first so rows of a batch have similar lengths; only the inner model runs.
    ``prefetch`` is asked for each batch's image patches while the batch before it runs.
    """
    hidden_size = model.config.text_config.hidden_size
    out = torch.empty((len(items), hidden_size), dtype=torch.float32)
    batches = length_sorted_batches(items, batch_size)
    with torch.inference_mode(), tqdm(total=len(items), disable=not progress, desc="documents", unit="item") as bar:
        for number, rows in enumerate(batches):
            if prefetch is not None:
                for ahead in batches[number : number + 2]:
                    prefetch(ahead)
            out[[row.index for row in rows]] = _embed_rows(model, rows, make_batch, emb_token_id)
            bar.update(len(rows))
    return out


def _embed_rows(
    model: Any,
    rows: Sequence[TokenizedItem],
    make_batch: Callable[[Sequence[TokenizedItem]], ModelBatch],
    emb_token_id: int,
) -> torch.Tensor:
    """One batch's embeddings; on out-of-memory the batch is halved and retried, down to one row."""
    try:
        batch = make_batch(rows)
        hidden = forward_prompts(model, batch, build_position_ids(model, batch))
        return gather_at_token(hidden, batch.input_ids, emb_token_id).float().cpu()
    except torch.OutOfMemoryError:
        if len(rows) == 1:
            raise
    logger.warning("rge: out of memory embedding %d documents at once; going on in halves", len(rows))
    release_memory()
    half = len(rows) // 2
    return torch.cat([_embed_rows(model, part, make_batch, emb_token_id) for part in (rows[:half], rows[half:])])
