"""The query path: batched greedy rationale decoding that captures ``<emb>`` in the step that feeds it.

One running batch shares a KV cache. Each step feeds every row its last generated token with explicit
3-D positions (last + 1 on all four rows, as ``generate`` does) and reads the final-norm hidden state.
A row whose fed token is ``<emb>``, or whose fed token is its ``max_new_tokens``-th, is finished: that
hidden state is its embedding, exactly the one the reference's extra forward pass computes. Tokens are
chosen as the checkpoint's generation config chooses them (``generation.py``): the arg-max after the
repetition penalty, which needs the ids of each row (prompt and generated tokens). Finished
rows leave the cache at once, left columns that are padding for every remaining row are trimmed, and
logits are computed only for rows still decoding. With admission on, waiting queries are prefilled
and merged into the running batch when enough rows have left, as continuous-batching servers do.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .batching import ModelBatch, TokenizedItem
from .forward import build_position_ids, forward_prompts, release_memory
from .generation import (
    GenerationSettings,
    RGEDecodingWarning,
    apply_repetition_penalty,
    best_token_holds_top_p,
    row_token_ids,
)


@dataclass
class DecodeResult:
    """Per item, in index order: the embedding (not normalised) and the generated token ids."""

    embeddings: torch.Tensor
    generated: list[list[int]]


@dataclass
class _Outputs:
    """Where finished rows land: embeddings and generated tokens (-1 where none), by item index."""

    embeddings: torch.Tensor  # (N, D) float32
    tokens: torch.Tensor  # (N, max_new_tokens)


@dataclass
class _Running:
    """The rows being decoded together and their shared state."""

    cache: Any
    attention_mask: torch.Tensor  # (R, T)
    next_positions: torch.Tensor  # (4, R): positions of the token each row feeds next
    next_tokens: torch.Tensor  # (R,): the token each row feeds next
    indices: torch.Tensor  # (R,): item index of each row
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

    def row_state_with(self, other: _Running) -> dict[str, Any]:
        """The row state (not the cache or mask) of these rows followed by ``other``'s."""
        return {
            "next_positions": torch.cat([self.next_positions, other.next_positions], dim=1),
            "next_tokens": torch.cat([self.next_tokens, other.next_tokens]),
            "indices": torch.cat([self.indices, other.indices]),
            "counts": torch.cat([self.counts, other.counts]),
            "token_ids": _merge_token_ids(self.token_ids, other.token_ids),
        }


class ReasoningDecoder:
    """Greedy decoding of many queries at once; see the module docstring for the algorithm.

    ``batch_size`` bounds the rows decoded together (and so the KV cache). ``admission`` lets waiting
    queries join the running batch once at least ``admit_fraction`` of it is free. Queries admitted
    together are prefilled in groups of similar length that spend at most ``max_padding`` of their
    tokens on padding, then merged: prefill compute is spent on real tokens.
    """

    def __init__(
        self,
        model: Any,
        make_batch: Callable[[Sequence[TokenizedItem]], ModelBatch],
        emb_token_id: int,
        *,
        max_new_tokens: int,
        batch_size: int,
        generation: GenerationSettings,
        admission: bool = True,
        admit_fraction: float = 0.25,
        max_padding: float = 0.25,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model
        self.make_batch = make_batch
        self.emb_token_id = emb_token_id
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.admission = admission
        self.admit_at = max(1, int(batch_size * admit_fraction))
        self.max_padding = max_padding
        self.generation = generation

    def run(self, items: Sequence[TokenizedItem], progress: bool = False) -> DecodeResult:
        """Decode all ``items``; waiting queries are taken longest prompt first."""
        device = self.model.device
        hidden_size = self.model.config.text_config.hidden_size
        outputs = _Outputs(
            embeddings=torch.empty((len(items), hidden_size), dtype=torch.float32, device=device),
            tokens=torch.full((len(items), self.max_new_tokens), -1, dtype=torch.long, device=device),
        )
        by_index = {item.index: item for item in items}
        waiting = deque(sorted(items, key=_longest_first))
        running: _Running | None = None
        limit, admit_at, newcomers = self.batch_size, self.admit_at, []
        with torch.inference_mode(), tqdm(total=len(items), disable=not progress, desc="queries", unit="item") as bar:
            while waiting or running is not None:
                try:
                    free = limit - (running.size if running is not None else 0)
                    if waiting and (running is None or (self.admission and free >= admit_at)):
                        newcomers = [waiting.popleft() for _ in range(min(free, len(waiting)))]
                        for group in _length_groups(newcomers, self.max_padding):
                            running = self._merge(running, self._prefill(group, outputs))
                        newcomers = []
                    assert running is not None
                    running, finished = self._step(running, outputs)
                    bar.update(finished)
                except torch.OutOfMemoryError:
                    if limit == 1:
                        raise
                    # Unfinished rows start again, with half the batch; finished rows keep their results.
                    in_flight = running.indices.tolist() if running else []
                    retry = list({**{i: by_index[i] for i in in_flight}, **{r.index: r for r in newcomers}}.values())
                    outputs.tokens[[item.index for item in retry]] = -1
                    waiting.extendleft(sorted(retry, key=_longest_first, reverse=True))
                    running, newcomers = None, []
                    limit = max(1, limit // 2)
                    admit_at = max(1, min(admit_at, limit // 4))
                    release_memory()
        generated = [row[row >= 0].tolist() for row in outputs.tokens.cpu()]
        return DecodeResult(outputs.embeddings.cpu(), generated)

    def scores(self, hidden: torch.Tensor, token_ids: torch.Tensor | None) -> torch.Tensor:
        """float32 logits of the rows still decoding, from their last hidden states (R, D), after the
        repetition penalty over each row's ``token_ids``; logits are computed for these rows only."""
        scores = self.model.lm_head(hidden).float()
        if token_ids is not None:
            scores = apply_repetition_penalty(scores, token_ids, self.generation.repetition_penalty)
        if self.generation.top_p_check and not best_token_holds_top_p(scores, self.generation):
            warnings.warn(
                f"with top_p={self.generation.top_p} generate would sample among several tokens at this step; "
                "rge takes the best one",
                RGEDecodingWarning,
                stacklevel=2,
            )
        return scores

    def next_tokens(self, scores: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The token each row generates: the arg-max of its ``scores`` (R, vocab).

        ``indices`` are the rows' item indices and ``counts`` the tokens each has generated so far.
        (Benchmarks override this to force rationale lengths.)
        """
        return scores.argmax(dim=-1)

    def _choose(
        self, hidden: torch.Tensor, token_ids: torch.Tensor | None, indices: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each row's next token, and the rows' ids with it appended (for the penalty's next step)."""
        tokens = self.next_tokens(self.scores(hidden, token_ids), indices, counts)
        if token_ids is not None:
            token_ids = torch.cat([token_ids, tokens[:, None]], dim=1)
        return tokens, token_ids

    def _prefill(self, rows: Sequence[TokenizedItem], outputs: _Outputs) -> _Running:
        from transformers import DynamicCache

        batch = self.make_batch(rows)
        positions = build_position_ids(self.model, batch)
        cache = DynamicCache(config=self.model.config)
        hidden = forward_prompts(self.model, batch, positions, cache)
        indices = torch.tensor([row.index for row in rows], device=hidden.device)
        penalize = self.generation.repetition_penalty != 1.0
        token_ids = row_token_ids(batch.input_ids, batch.attention_mask) if penalize else None
        first, token_ids = self._choose(hidden[:, -1], token_ids, indices, torch.zeros_like(indices))
        outputs.tokens[indices, 0] = first
        return _Running(
            cache=cache,
            attention_mask=batch.attention_mask,
            next_positions=positions[:, :, -1] + 1,
            next_tokens=first,
            indices=indices,
            counts=torch.ones_like(first),
            token_ids=token_ids,
        )

    def _step(self, running: _Running, outputs: _Outputs) -> tuple[_Running | None, int]:
        """Feed each row its next token; capture finished rows, drop them, choose the others' next token."""
        hidden = self._decode_forward(running)
        done = (running.next_tokens == self.emb_token_id) | (running.counts >= self.max_new_tokens)
        running.next_positions = running.next_positions + 1
        finished = int(done.sum())
        if finished:
            outputs.embeddings[running.indices[done]] = hidden[done].float()
            if finished == running.size:
                return None, finished
            hidden = hidden[self._select_rows(running, (~done).nonzero().squeeze(1))]
        running.next_tokens, running.token_ids = self._choose(
            hidden, running.token_ids, running.indices, running.counts
        )
        outputs.tokens[running.indices, running.counts] = running.next_tokens
        running.counts = running.counts + 1
        return running, finished

    def _decode_forward(self, running: _Running) -> torch.Tensor:
        """One decode step of the inner model: the final-norm states (R, D) of the tokens fed."""
        mask = F.pad(running.attention_mask, (0, 1), value=1)
        hidden = self.model.model(
            input_ids=running.next_tokens[:, None],
            attention_mask=mask,
            position_ids=running.next_positions[:, :, None],
            past_key_values=running.cache,
            use_cache=True,
        ).last_hidden_state[:, -1]
        running.attention_mask = mask
        return hidden  # type: ignore[no-any-return]

    def _select_rows(self, running: _Running, keep: torch.Tensor) -> torch.Tensor:
        """Keep rows ``keep``; returns the kept rows' former positions in their new order."""
        _select_rows(running, keep)
        return keep

    def _merge(self, running: _Running | None, newcomers: _Running) -> _Running:
        return _merge(running, newcomers)


def _length_groups(rows: Sequence[TokenizedItem], max_padding: float) -> list[list[TokenizedItem]]:
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


def _longest_first(item: TokenizedItem) -> tuple[int, int]:
    return (-len(item), item.index)


def _select_rows(running: _Running, keep: torch.Tensor) -> None:
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


def _merge(running: _Running | None, newcomers: _Running) -> _Running:
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
    return _Running(
        cache=running.cache,
        attention_mask=torch.cat([left_pad(running.attention_mask, 1), left_pad(newcomers.attention_mask, 1)]),
        **running.row_state_with(newcomers),
    )


def _merge_token_ids(old: torch.Tensor | None, new: torch.Tensor | None) -> torch.Tensor | None:
    """Rows' ids of two batches in one tensor; a shorter row is left-padded with its own first id."""
    if old is None or new is None:
        return None
    width = max(old.shape[1], new.shape[1])
    padded = [torch.cat([ids[:, :1].expand(-1, width - ids.shape[1]), ids], dim=1) for ids in (old, new)]
    return torch.cat(padded)
