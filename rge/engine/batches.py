"""The operations on running decode batches (``DecodeBatches``), the step arithmetic every KV-cache kind
shares, and the kind that keeps rows in transformers' ``DynamicCache``.

A decode step feeds each row the token it chose last, with explicit 3-D positions (last + 1 on all four
rows, as ``generate`` does), and reads the final-norm hidden states. A row whose fed token is ``<emb>``, or
whose fed token is its ``max_new_tokens``-th, is finished: that hidden state is its embedding, exactly
the one the reference's extra forward pass computes. Every other row chooses its next token: the logits
of its hidden state, the repetition penalty over the ids it holds (``decoding_settings.py``), the token choice
(the arg-max). All of it stays on the device; the host reads the step's results once, which rows
finished, then takes them out of the batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .batching import ModelBatch, TokenizedItem
from .decode_attention import step_mask
from .decode_config import DecodeConfig, TokenChoice
from .decoding_settings import RGEDecodingWarning, apply_repetition_penalty, row_token_ids, top_p_holds
from .forward import build_position_ids, forward_prompts
from .rows import DynamicRows


@dataclass(frozen=True)
class FinishedRow:
    """A row whose ``<emb>`` was fed: its output row, embedding (float32 on the CPU, not normalised) and the
    token ids it generated (``<emb>`` included when it was emitted within the budget)."""

    row: int
    embedding: torch.Tensor
    token_ids: list[int]


class DecodeBatches(Protocol):
    """The per-batch operations of one KV-cache kind; a ``DecodeStream`` drives them. A running batch is
    the kind's own object (a ``Batch``)."""

    config: DecodeConfig
    choice: TokenChoice
    hidden_size: int

    def prefill(self, items: Sequence[TokenizedItem]) -> DynamicRows:
        """Run ``items``' prompts (their ``index`` is their output row) and choose each one's first token."""
        ...

    def merge(self, running: Any | None, newcomers: DynamicRows, slots: int) -> Any:
        """``newcomers`` joined to the running batch (at most ``slots`` rows run together now)."""
        ...

    def step(self, running: Any) -> tuple[Any | None, list[FinishedRow]]:
        """Feed each row its next token; the batch left (None when empty) and the rows that finished."""
        ...

    def keep(self, running: Any, positions: Sequence[int]) -> Any | None:
        """Keep the rows at ``positions`` (ascending); None when none is left."""
        ...

    def release(self, running: Any) -> None:
        """The batch has emptied (every row finished or was cancelled): its cache may be reused."""
        ...


def choose_next(
    scores_of: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    hidden: torch.Tensor,
    fed: torch.Tensor,
    counts: torch.Tensor,
    rows: torch.Tensor,
    token_ids: torch.Tensor | None,
    config: DecodeConfig,
    choice: TokenChoice,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For rows that fed ``fed`` with ``counts`` tokens generated and hold ``token_ids`` (the fed token
    included): which finished, each row's next token (a finished row's is never used), and, when the
    settings ask, whether top-p kept the best token alone."""
    done = (fed == config.emb_token_id) | (counts >= config.max_new_tokens)
    scores = scores_of(hidden, token_ids)
    holds = top_p_holds(scores, config.generation) | done if config.generation.top_p_check else None
    return done, choice(scores, rows, counts), holds


def penalized_scores(
    model: Any, hidden: torch.Tensor, token_ids: torch.Tensor | None, config: DecodeConfig
) -> torch.Tensor:
    """float32 logits of ``hidden`` (R, D), after the repetition penalty over each row's ``token_ids``."""
    scores = model.lm_head(hidden).float()
    return (
        scores
        if token_ids is None
        else apply_repetition_penalty(scores, token_ids, config.generation.repetition_penalty)
    )


def advance(
    chosen: torch.Tensor,
    done: torch.Tensor,
    tokens: torch.Tensor,
    counts: torch.Tensor,
    positions: torch.Tensor,
    history: torch.Tensor,
) -> None:
    """In place: rows not ``done`` take their ``chosen`` token as the one they feed next and record it."""
    column = counts.clamp(0, history.shape[1] - 1)[:, None]
    history.scatter_(1, column, torch.where(done, history.gather(1, column)[:, 0], chosen)[:, None])
    tokens.copy_(torch.where(done, tokens, chosen))
    counts.add_((~done).long())
    positions.add_(1)


def read_finished(done: torch.Tensor, holds: torch.Tensor | None) -> list[int]:
    """Positions of the finished rows: the step's one read of the device."""
    flags = done.tolist() if holds is None else torch.cat([done, holds]).tolist()
    if holds is not None and not all(flags[len(done) :]):
        warnings.warn("with this top_p generate would sample among several tokens at this step; rge takes the best",
                      RGEDecodingWarning, stacklevel=3)  # fmt: skip
    return [position for position, flag in enumerate(flags[: len(done)]) if flag]


def finished_rows(
    hidden: torch.Tensor, history: torch.Tensor, output_rows: torch.Tensor, positions: Sequence[int]
) -> list[FinishedRow]:
    """The results of the rows at ``positions``, copied to the host."""
    if not positions:
        return []
    index = torch.tensor(list(positions), device=hidden.device)
    embeddings, tokens = hidden[index].float().cpu(), history[index].cpu()
    rows = output_rows[index].tolist()
    return [FinishedRow(int(row), embedding, [t for t in ids.tolist() if t >= 0])
            for row, embedding, ids in zip(rows, embeddings, tokens)]  # fmt: skip


class Prefiller:
    """What every KV-cache kind shares: prompts prefilled into a ``DynamicCache`` (the newcomers, which the
    slot kinds then copy into their slots), and scores from hidden states."""

    def __init__(
        self,
        model: Any,
        make_batch: Callable[[Sequence[TokenizedItem]], ModelBatch],
        config: DecodeConfig,
        choice: TokenChoice,
    ) -> None:
        self.model, self.make_batch, self.config, self.choice = model, make_batch, config, choice
        self.hidden_size = int(model.config.text_config.hidden_size)

    def scores(self, hidden: torch.Tensor, token_ids: torch.Tensor | None) -> torch.Tensor:
        return penalized_scores(self.model, hidden, token_ids, self.config)

    def conclude(
        self, running: Any, hidden: torch.Tensor, done: torch.Tensor, holds: torch.Tensor | None
    ) -> tuple[Any | None, list[FinishedRow]]:
        """After a step: read which rows finished (the step's one read of the device), copy their results,
        keep the others."""
        positions = read_finished(done, holds)
        finished = finished_rows(hidden, running.history, running.output_rows, positions)
        if not positions:
            return running, finished
        gone = set(positions)
        return self.keep(running, [p for p in range(running.size) if p not in gone]), finished  # type: ignore[attr-defined]

    def prefill(self, items: Sequence[TokenizedItem]) -> DynamicRows:
        from transformers import DynamicCache

        batch = self.make_batch(items)
        positions = build_position_ids(self.model, batch)
        cache = DynamicCache(config=self.model.config)
        hidden = forward_prompts(self.model, batch, positions, cache)[:, -1]
        rows = torch.tensor([item.index for item in items], device=hidden.device)
        token_ids = row_token_ids(batch.input_ids, batch.attention_mask) if self.config.penalizes else None
        counts = torch.zeros_like(rows)
        history = torch.full((len(items), self.config.max_new_tokens), -1, dtype=torch.long, device=hidden.device)
        newcomers = DynamicRows(cache, batch.attention_mask, positions[:, :, -1].clone(), torch.zeros_like(rows), rows,
                                counts, history, token_ids)  # fmt: skip
        scores = self.scores(hidden, token_ids)
        none_done = torch.zeros_like(rows, dtype=torch.bool)
        if self.config.generation.top_p_check:
            read_finished(none_done, top_p_holds(scores, self.config.generation))
        first = self.choice(scores, rows, counts)
        advance(first, none_done, newcomers.tokens, counts, newcomers.positions, history)
        return newcomers


class DynamicBatches(Prefiller):
    """Rows in transformers' ``DynamicCache``: each step appends a column to every layer (a copy of the
    cache); finished rows leave with ``batch_select_indices``, and columns that are padding for every row
    left are trimmed."""

    def merge(self, running: DynamicRows | None, newcomers: DynamicRows, slots: int) -> DynamicRows:
        if running is None:
            return newcomers
        running.append(newcomers)
        return running

    def step(self, running: DynamicRows) -> tuple[DynamicRows | None, list[FinishedRow]]:
        hidden = self._forward(running)
        if running.token_ids is not None:  # the fed token joins the ids the penalty applies to
            running.token_ids = torch.cat([running.token_ids, running.tokens[:, None]], dim=1)
        done, chosen, holds = choose_next(self.scores, hidden, running.tokens, running.counts, running.output_rows,
                                          running.token_ids, self.config, self.choice)  # fmt: skip
        advance(chosen, done, running.tokens, running.counts, running.positions, running.history)
        return self.conclude(running, hidden, done, holds)

    def keep(self, running: DynamicRows, positions: Sequence[int]) -> DynamicRows | None:
        if not positions:
            return None
        running.keep(positions)
        return running

    def release(self, running: DynamicRows) -> None:
        """Nothing to give back: the cache goes with the batch."""

    def _forward(self, running: DynamicRows) -> torch.Tensor:
        """One decode step of the inner model: the final-norm states (R, D) of the tokens fed."""
        mask = F.pad(running.attention_mask, (0, 1), value=1)
        hidden = self.model.model(
            input_ids=running.tokens[:, None],
            attention_mask=step_mask(mask, self.model.model.language_model),
            position_ids=running.positions[:, :, None],
            past_key_values=running.cache,
            use_cache=True,
        ).last_hidden_state[:, -1]
        running.attention_mask = mask
        return hidden  # type: ignore[no-any-return]
