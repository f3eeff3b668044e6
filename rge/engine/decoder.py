"""The query path: batched greedy rationale decoding that captures ``<emb>`` in the step that feeds it.

One running batch shares a KV cache (``batches.py`` holds the step; ``slot_batches.py`` the preallocated
kinds). Tokens are chosen as the checkpoint's generation config chooses them (``decoding_settings.py``): the
arg-max after the repetition penalty. Finished rows leave the cache at once, and with admission on,
waiting queries are prefilled and merged into the running batch when enough rows have left, as
continuous-batching servers do (``stream.py``: the same loop takes queries that arrive while others
decode).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .batches import DecodeBatches
from .batching import ModelBatch, TokenizedItem, longest_first
from .cache_pool import SlotCachePool
from .decode_config import GREEDY, DecodeConfig, TokenChoice
from .slot_batches import BATCHES, SlotBatches
from .stream import DecodeStream, Prefetch


@dataclass
class DecodeResult:
    """Per item, in index order: the embedding (not normalised) and the generated token ids."""

    embeddings: torch.Tensor
    generated: list[list[int]]


class ReasoningDecoder:
    """Greedy decoding of many queries at once, on the KV cache ``kv_cache`` names (``slot_batches.BATCHES``).

    ``choice`` picks each row's next token (the arg-max by default; benchmarks force rationale lengths);
    ``prefetch`` starts the image work of items about to be admitted, off this thread (None: it is done
    when their batch is built); slot caches come from ``pool`` (reused across decodes).
    """

    def __init__(
        self,
        model: Any,
        make_batch: Callable[[Sequence[TokenizedItem]], ModelBatch],
        config: DecodeConfig,
        *,
        kv_cache: str = "dynamic",
        choice: TokenChoice = GREEDY,
        prefetch: Prefetch | None = None,
        pool: SlotCachePool | None = None,
    ) -> None:
        kind = BATCHES[kv_cache]
        self.config, self.prefetch = config, prefetch
        self.batches: DecodeBatches = (
            kind(model, make_batch, config, choice, pool) if issubclass(kind, SlotBatches)  # type: ignore[assignment]
            else kind(model, make_batch, config, choice)
        )  # fmt: skip

    def run(self, items: Sequence[TokenizedItem], progress: bool = False) -> DecodeResult:
        """Decode all ``items`` (indexed 0..N-1); waiting queries are taken longest prompt first."""
        stream = self.stream(rows=len(items))
        stream.submit((item.index, item) for item in sorted(items, key=longest_first))
        embeddings = torch.empty((len(items), self.batches.hidden_size), dtype=torch.float32)
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
        return DecodeStream(self.batches, rows=rows, prefetch=self.prefetch, on_ready=on_ready)
