"""Held-out retrieval while training: how well the model retrieves with and without reasoning, and how long
its rationales are, so that a run can be watched for RGE's known failure (rationales collapsing to ``<emb>``
alone, when queries stop reasoning and embed like candidates).

Each eval row's query is scored against the pool of the eval rows' distinct positives (MMEB-style
retrieval: the row's own positive is the one relevant candidate; a tie counts for it, as MMEB's arg-max
puts the positive first). Queries go through the query path (a greedy rationale, then ``<emb>``:
``..._reasoning``) and through the candidate path (``..._no_reasoning``), both against the same candidate
embeddings. The model runs in eval mode (no dropout) without gradient, in its weights' precision, as the
training step generates its rationales; with LoRA the adapted weights are used.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from ..encoder import RGEEncoder
from ..engine.batching import TokenizedItem
from ..errors import RGEInputError
from ..prompts import EMB_TOKEN
from ..types import KVCache
from .data import Side, TrainingDataError, TrainingExample

COLLAPSED_SHARE = 0.5
"""Above this share of ``<emb>``-alone rationales (or a median of 0 tokens), the run is warned."""

NDCG_CUTOFF = 10

logger = logging.getLogger("rge.training")


def evaluate_retrieval(
    encoder: RGEEncoder, examples: Sequence[TrainingExample], *, batch_size: int = 8, max_new_tokens: int | None = None
) -> dict[str, float]:
    """The ``eval/...`` metrics of ``encoder`` on ``examples`` (``rge.training.config.EVAL_METRICS``, plus
    ``eval/rows`` used and ``eval/seconds``): Recall@1 and NDCG@10 with and without reasoning, and the
    rationale lengths in tokens before ``<emb>`` (mean, median, p10, p90, and the share of ``<emb>`` alone).

    The model is put in eval mode for the evaluation and back in the mode it was in. A row whose query or
    positive cannot be prepared (an unreadable image, a prompt too long) is left out, with a warning;
    TrainingDataError when none is left.
    """
    started = time.perf_counter()
    model = encoder.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            metrics = _evaluate(encoder, examples, batch_size, max_new_tokens or encoder.max_new_tokens)
    finally:
        model.train(was_training)
    return {**metrics, "eval/seconds": round(time.perf_counter() - started, 4)}


def warn_if_collapsed(metrics: dict[str, float], step: int) -> bool:
    """One warning (``rge.training`` logger) when the eval rationales collapsed to ``<emb>`` alone: a median
    of 0 tokens before ``<emb>``, or more than ``COLLAPSED_SHARE`` of them. Returns whether it warned."""
    share, median = metrics["eval/emb_only_share"], metrics["eval/rationale_tokens_median"]
    if not (median == 0 or share > COLLAPSED_SHARE):
        return False
    logger.warning(
        "step %d: rationales collapsed to %s alone on the eval rows (%.0f%% of them, median %g tokens before it): "
        "the model has stopped reasoning, so its queries embed like candidates and reasoning no longer helps "
        "(compare eval/recall@1_reasoning with eval/recall@1_no_reasoning). What to try: distinct instructions "
        "on the query and candidate sides, supervision rationales on the query rows, a lower --lm-weight or "
        'learning rate; see "Rationales shrinking to <emb> alone" in docs/training.md',
        step, EMB_TOKEN, 100 * share, median,
    )  # fmt: skip
    return True


def _evaluate(
    encoder: RGEEncoder, examples: Sequence[TrainingExample], batch_size: int, budget: int
) -> dict[str, float]:
    pool: dict[Side, TrainingExample] = {}  # each distinct positive, with the first row that has it
    for example in examples:
        pool.setdefault(example.positive, example)
    index = {side: number for number, side in enumerate(pool)}
    targets = [index[example.positive] for example in examples]
    candidates = _embed(encoder, list(pool), list(pool.values()), False, batch_size, budget)
    queries = [example.query for example in examples]
    reasoning = _embed(encoder, queries, examples, True, batch_size, budget)
    plain = _embed(encoder, queries, examples, False, batch_size, budget)
    rows = _usable_rows(examples, targets, candidates, reasoning, plain)
    target = torch.tensor([targets[row] for row in rows], dtype=torch.long)
    unusable = ~torch.tensor(candidates.usable)
    lengths = [_rationale_length(reasoning.generated[row], encoder.checkpoint.emb_token_id) for row in rows]
    return {
        **_retrieval(reasoning.embeddings[rows], candidates.embeddings, unusable, target, "reasoning"),
        **_retrieval(plain.embeddings[rows], candidates.embeddings, unusable, target, "no_reasoning"),
        **_length_stats(lengths),
        "eval/rows": len(rows),
    }


class _Embedded:
    """Normalised embeddings of some sides (zeros where one could not be prepared), and their rationales."""

    def __init__(self, count: int, dim: int) -> None:
        self.embeddings = torch.zeros((count, dim), dtype=torch.float32)
        self.generated: list[list[int]] = [[] for _ in range(count)]
        self.errors: list[str | None] = [None] * count

    @property
    def usable(self) -> list[bool]:
        return [error is None for error in self.errors]


def _embed(
    encoder: RGEEncoder,
    sides: Sequence[Side],
    rows: Sequence[TrainingExample],
    reason: bool,
    batch_size: int,
    budget: int,
) -> _Embedded:
    """``sides`` (each read as ``rows[i]`` says: EXIF rotation) on the query path (``reason``) or the candidate
    path, prepared a batch at a time so that only one batch of images is held."""
    done = _Embedded(len(sides), encoder.embedding_dim)
    for start in range(0, len(sides), batch_size):
        items: list[TokenizedItem] = []
        placed: list[int] = []
        for row in range(start, min(start + batch_size, len(sides))):
            try:
                item = _prepare(encoder, sides[row], rows[row], reason, budget)
            except RGEInputError as error:
                done.errors[row] = error.reason
                continue
            items.append(replace(item, index=len(items)))
            placed.append(row)
        if not items:
            continue
        if reason:
            eager: KVCache | None = "preallocated" if encoder.device.type == "cuda" else None  # as the step decodes
            result = encoder.query_decoder(batch_size, budget, kv_cache=eager).run(items)
            embeddings = result.embeddings
            for row, tokens in zip(placed, result.generated):
                done.generated[row] = tokens
        else:
            embeddings = encoder.candidate_embeddings(items, batch_size)
        done.embeddings[placed] = F.normalize(embeddings.float().cpu(), dim=-1)
    return done


def _prepare(encoder: RGEEncoder, side: Side, row: TrainingExample, reason: bool, budget: int) -> TokenizedItem:
    item = {"text": side.text} if side.image is None else {"text": side.text, "image": side.image}
    return encoder.prepare([item], reason=reason, exif_transpose=row.exif_transpose, max_new_tokens=budget)[0]


def _usable_rows(
    examples: Sequence[TrainingExample],
    targets: list[int],
    candidates: _Embedded,
    reasoning: _Embedded,
    plain: _Embedded,
) -> list[int]:
    """The rows whose query (both paths) and positive were prepared; a warning names the first other one."""
    rows, first = [], None
    for row, target in enumerate(targets):
        error = reasoning.errors[row] or plain.errors[row] or candidates.errors[target]
        if error is None:
            rows.append(row)
        elif first is None:
            first = f"{examples[row].source}: {error}"
    if first is not None:
        if not rows:
            raise TrainingDataError(f"no eval row could be prepared ({first})")
        logger.warning("%d of %d eval rows cannot be prepared and are left out of the evaluation (first: %s)",
                       len(examples) - len(rows), len(examples), first)  # fmt: skip
    return rows


def _retrieval(
    queries: torch.Tensor, candidates: torch.Tensor, unusable: torch.Tensor, target: torch.Tensor, path: str
) -> dict[str, float]:
    """Recall@1 and NDCG@10 of each query's own positive among all usable candidates (a tie counts for it)."""
    scores = (queries @ candidates.T).masked_fill(unusable, -math.inf)
    rank = (scores > scores.gather(1, target[:, None])).sum(dim=1)
    gain = torch.where(rank < NDCG_CUTOFF, 1 / torch.log2(rank.float() + 2), torch.zeros(()))
    recall = float((rank == 0).double().mean())
    return {f"eval/recall@1_{path}": recall, f"eval/ndcg@10_{path}": float(gain.double().mean())}


def _rationale_length(tokens: list[int], emb_token_id: int) -> int:
    """Tokens before ``<emb>`` (the whole budget when ``<emb>`` never came)."""
    return len(tokens) - 1 if tokens and tokens[-1] == emb_token_id else len(tokens)


def _length_stats(lengths: list[int]) -> dict[str, float]:
    values = np.asarray(lengths, dtype=np.float64)
    p10, median, p90 = (float(value) for value in np.percentile(values, [10, 50, 90]))
    return {"eval/rationale_tokens_mean": float(values.mean()), "eval/rationale_tokens_median": median,
            "eval/rationale_tokens_p10": p10, "eval/rationale_tokens_p90": p90,
            "eval/emb_only_share": float((values == 0).mean())}  # fmt: skip
