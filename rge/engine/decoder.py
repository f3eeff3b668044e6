"""The query path: batched greedy rationale decoding that captures ``<emb>`` in the step that feeds it.

One running batch shares a KV cache. Each step feeds every row its last generated token with explicit
3-D positions (last + 1 on all four rows, as ``generate`` does) and reads the final-norm hidden state.
A row whose fed token is ``<emb>``, or whose fed token is its ``max_new_tokens``-th, is finished: that
hidden state is its embedding, exactly the one the reference's extra forward pass computes. Tokens are
chosen as the checkpoint's generation config chooses them (``generation.py``): the arg-max after the
repetition penalty, which needs the ids of each row (prompt and generated tokens). Finished
rows leave the cache at once, left columns that are padding for every remaining row are trimmed, and
logits are computed only for rows still decoding. With admission on, waiting queries are prefilled
and merged into the running batch when enough rows have left, as continuous-batching servers do
(``stream.py``: the same loop takes queries that arrive while others decode).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .batching import ModelBatch, TokenizedItem
from .forward import build_position_ids, forward_prompts
from .generation import (
    GenerationSettings,
    RGEDecodingWarning,
    apply_repetition_penalty,
    best_token_holds_top_p,
    row_token_ids,
)
from .rows import Outputs, Running, longest_first, merge, select_rows
from .stream import DecodeStream, Prefetch


@dataclass
class DecodeResult:
    """Per item, in index order: the embedding (not normalised) and the generated token ids."""

    embeddings: torch.Tensor
    generated: list[list[int]]


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
        prefetch: Prefetch | None = None,
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
        self.prefetch = prefetch
        """Starts the image work of items about to be admitted, off this thread (None: done when batched)."""

    def run(self, items: Sequence[TokenizedItem], progress: bool = False) -> DecodeResult:
        """Decode all ``items`` (indexed 0..N-1); waiting queries are taken longest prompt first."""
        stream = self.stream(rows=len(items))
        stream.submit((item.index, item) for item in sorted(items, key=longest_first))
        embeddings = torch.empty((len(items), self.model.config.text_config.hidden_size), dtype=torch.float32)
        generated: list[list[int]] = [[] for _ in items]
        with torch.inference_mode(), tqdm(total=len(items), disable=not progress, desc="queries", unit="item") as bar:
            while stream.busy:
                finished = stream.step()
                for query in finished:
                    index = int(query.key)  # type: ignore[call-overload]
                    embeddings[index], generated[index] = query.embedding, query.token_ids
                bar.update(len(finished))
        return DecodeResult(embeddings, generated)

    def stream(self, rows: int | None = None, on_ready: Callable[[], None] | None = None) -> DecodeStream:
        """A running decode that takes queries at any step (``rows`` at most at once: the batch size).

        Without ``on_ready`` a step waits for the inputs it needs when nothing else can run; with it, a step
        never waits, and ``on_ready`` is called (from a worker) when a waiting item's inputs are made.
        """
        return DecodeStream(self, rows, on_ready)

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

        ``indices`` are the rows' output rows (``DecodeStream.key_of`` gives their queries) and ``counts``
        the tokens each has generated so far.
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

    def _prefill(self, rows: Sequence[TokenizedItem], outputs: Outputs) -> Running:
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
        return Running(
            cache=cache,
            attention_mask=batch.attention_mask,
            next_positions=positions[:, :, -1] + 1,
            next_tokens=first,
            indices=indices,
            counts=torch.ones_like(first),
            token_ids=token_ids,
        )

    def _step(self, running: Running, outputs: Outputs) -> tuple[Running | None, torch.Tensor]:
        """Feed each row its next token; capture finished rows, drop them, choose the others' next token.
        Returns the batch left (None when empty) and the output rows that finished."""
        hidden = self._decode_forward(running)
        done = (running.next_tokens == self.emb_token_id) | (running.counts >= self.max_new_tokens)
        running.next_positions = running.next_positions + 1
        finished = running.indices[done]
        if finished.numel():
            outputs.embeddings[finished] = hidden[done].float()
            if finished.numel() == running.size:
                return None, finished
            hidden = hidden[self._select_rows(running, (~done).nonzero().squeeze(1))]
        running.next_tokens, running.token_ids = self._choose(
            hidden, running.token_ids, running.indices, running.counts
        )
        outputs.tokens[running.indices, running.counts] = running.next_tokens
        running.counts = running.counts + 1
        return running, finished

    def _decode_forward(self, running: Running) -> torch.Tensor:
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

    def _select_rows(self, running: Running, keep: torch.Tensor) -> torch.Tensor:
        """Keep rows ``keep``; returns the kept rows' former positions in their new order."""
        select_rows(running, keep)
        return keep

    def _merge(self, running: Running | None, newcomers: Running, slots: int) -> Running:
        """``newcomers`` joined to the running batch (at most ``slots`` rows ever run together)."""
        return merge(running, newcomers)

    def _release(self, running: Running) -> None:
        """The batch ``running`` has emptied (every row finished or cancelled): its cache may be reused."""
