"""Reading the embedding out of hidden states: the state at the ``<emb>`` token, L2-normalised."""

from __future__ import annotations

import torch


def gather_at_token(hidden: torch.Tensor, input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """The (B, D) hidden states at each row's first ``token_id``, found by id (never a fixed index)."""
    is_token = input_ids == token_id
    if not bool(is_token.any(dim=1).all()):
        raise ValueError("a row has no <emb> token to pool")
    first = is_token.int().argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]


def l2_normalize(embeddings: torch.Tensor) -> torch.Tensor:
    """Unit-length rows, computed in float32."""
    return torch.nn.functional.normalize(embeddings.float(), p=2, dim=-1)
