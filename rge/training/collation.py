"""Training sequences for the LM loss, as the authors build them: the query prompt (system turn, user turn
with the image first, the assistant turn's opening) followed by the supervision rationale and ``<emb>``,
with no ``<|im_end|>`` after it (``<emb>`` ends the turn). Labels cover exactly the rationale and ``<emb>``;
on the candidate side (prompt + ``<emb>``) the label is ``<emb>`` alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..engine.batching import ModelBatch, TokenizedItem, collate
from .losses import IGNORE_INDEX


@dataclass(frozen=True)
class TrainingSequence:
    """One sequence of the LM branch: its prompt item with the labelled tokens appended, and their count."""

    item: TokenizedItem
    labelled: int
    """How many tokens at the end are labels (the rationale and ``<emb>``, ``<emb>`` alone, or none)."""


def query_sequence(prompt: TokenizedItem, rationale_ids: Sequence[int], emb_token_id: int) -> TrainingSequence:
    """A query prompt (``prepare(..., reason=True)``) followed by ``rationale_ids`` and ``<emb>``, all labelled."""
    if emb_token_id in rationale_ids:
        raise ValueError("a supervision rationale must not contain <emb>")
    appended = [*rationale_ids, emb_token_id]
    item = TokenizedItem(prompt.index, [*prompt.input_ids, *appended], prompt.image)
    return TrainingSequence(item, len(appended))


def candidate_sequence(prompt: TokenizedItem, emb_token_id: int) -> TrainingSequence:
    """A candidate prompt (``prepare(..., reason=False)``, ending in ``<emb>``); ``<emb>`` alone is labelled."""
    if not prompt.input_ids or prompt.input_ids[-1] != emb_token_id:
        raise ValueError("a candidate prompt ends with <emb>")
    return TrainingSequence(prompt, 1)


def unlabelled_sequence(item: TokenizedItem) -> TrainingSequence:
    """A sequence that only gives an embedding (a query prompt followed by its self-generated rationale)."""
    return TrainingSequence(item, 0)


def collate_training(
    sequences: Sequence[TrainingSequence], pad_id: int, image_pad_id: int
) -> tuple[ModelBatch, torch.Tensor]:
    """Left-padded model inputs (as the query path pads them) and labels (B, T): the token id at labelled
    positions, ``IGNORE_INDEX`` elsewhere."""
    batch = collate([sequence.item for sequence in sequences], pad_id, image_pad_id)
    labels = torch.full_like(batch.input_ids, IGNORE_INDEX)
    for row, sequence in enumerate(sequences):
        if sequence.labelled:
            labels[row, -sequence.labelled :] = batch.input_ids[row, -sequence.labelled :]
    return batch, labels
