"""Ray Data: encode datasets larger than one machine with ``map_batches``.

>>> import ray
>>> from rge.integrations.ray import RGEBatchEncoder
>>> ds = ray.data.read_parquet("s3://bucket/corpus/")                              # doctest: +SKIP
>>> ds = ds.map_batches(RGEBatchEncoder, fn_constructor_kwargs={"model": "MCG-NJU/RGE"},
...                     compute=ray.data.ActorPoolStrategy(size=8), num_gpus=1, batch_size=64)  # doctest: +SKIP

The model is loaded once per actor. ``rge encode ... --ray`` runs the same job on a cluster and writes the
same resumable shards as a local run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np

from ..errors import require_extra

require_extra("ray.data", extra="ray", needed_by=__name__)

from ..corpus import Chunk, EncodeRows, Result, encode_items_skipping  # noqa: E402
from ..encoder import RGEEncoder  # noqa: E402
from ..types import CorpusSide  # noqa: E402


class RGEBatchEncoder:
    """A callable class for ``Dataset.map_batches``: adds an ``embedding`` column (and ``rationale`` on the
    query side) computed from the ``text`` and ``image`` columns (image paths or bytes; empty for none).

    ``on_error="raise"`` fails the batch on a bad row; ``"report"`` gives it a zero embedding and its
    message in an ``error`` column ("" for good rows).
    """

    def __init__(
        self,
        model: str = "MCG-NJU/RGE",
        *,
        side: CorpusSide = "document",
        batch_size: int = 16,
        text_column: str = "text",
        image_column: str = "image",
        on_error: Literal["raise", "report"] = "raise",
        **load_kwargs: Any,
    ) -> None:
        if side not in ("document", "query") or on_error not in ("raise", "report"):
            raise ValueError("side must be 'document' or 'query', on_error 'raise' or 'report'")
        self.encoder = RGEEncoder.from_pretrained(model, **load_kwargs)
        self.side, self.batch_size, self.on_error = side, batch_size, on_error
        self.text_column, self.image_column = text_column, image_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = _items(batch, self.text_column, self.image_column)
        reason = self.side == "query"
        if self.on_error == "raise":
            vectors, rationales = self.encoder.encode(
                items, reason=reason, batch_size=self.batch_size, return_rationales=True, show_progress_bar=False
            )
            return self._with_columns(batch, vectors, list(rationales), {})
        good, rationales, failed = encode_items_skipping(self.encoder, items, reason, self.batch_size)
        vectors = np.zeros((len(items), self.encoder.embedding_dim), np.float32)
        texts = [""] * len(items)
        ok = [index for index in range(len(items)) if index not in failed]
        vectors[ok] = good
        for index, rationale in zip(ok, rationales):
            texts[index] = rationale
        return self._with_columns(batch, vectors, texts, failed)

    def _with_columns(
        self, batch: dict[str, np.ndarray], vectors: np.ndarray, rationales: list[str], failed: dict[int, str]
    ) -> dict[str, np.ndarray]:
        out = dict(batch)
        out["embedding"] = vectors
        if self.side == "query":
            out["rationale"] = np.array(rationales, dtype=object)
        if self.on_error == "report":
            out["error"] = np.array([failed.get(i, "") for i in range(len(vectors))], dtype=object)
        return out


def _items(batch: dict[str, np.ndarray], text_column: str, image_column: str) -> list[dict[str, Any]]:
    size = len(next(iter(batch.values())))
    texts = batch.get(text_column)
    images = batch.get(image_column)
    items = []
    for row in range(size):
        text = texts[row] if texts is not None else ""
        item: dict[str, Any] = {"text": "" if text is None else str(text)}
        image = images[row] if images is not None else None
        if image is not None and len(image) > 0:
            item["image"] = bytes(image) if isinstance(image, (bytes, bytearray, np.ndarray)) else str(image)
        items.append(item)
    return items


def ray_encode_rows(
    model: str,
    side: CorpusSide,
    batch_size: int,
    *,
    workers: int,
    address: str | None = None,
    load_kwargs: dict[str, Any] | None = None,
) -> EncodeRows:
    """``encode_rows`` for ``rge encode --ray``: one actor pool for the whole job, results kept in input order."""

    def encode_rows(chunks: Iterator[Chunk]) -> Iterator[tuple[Chunk, Result]]:
        import ray

        pending = list(chunks)
        rows = [{"position": r.position, "text": r.text, "image": r.image or ""} for good, _ in pending for r in good]
        results: Iterator[dict[str, Any]] = iter(())
        if rows:
            if not ray.is_initialized():
                ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
            ray.data.DataContext.get_current().execution_options.preserve_order = True
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
            dataset = ray.data.from_items(rows).map_batches(
                RGEBatchEncoder,
                fn_constructor_kwargs={"model": model, "side": side, "batch_size": batch_size, "on_error": "report",
                                       **(load_kwargs or {})},
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_gpus=gpus,
                batch_size=batch_size,
            )  # fmt: skip
            results = iter(dataset.iter_rows())
        for good, bad in pending:
            got = [next(results) for _ in good]
            assert [g["position"] for g in got] == [row.position for row in good], "Ray returned rows out of order"
            kept = [g for g in got if not g["error"]]
            width = len(got[0]["embedding"]) if got else 0
            vectors = np.stack([g["embedding"] for g in kept]).astype(np.float32) if kept else np.zeros((0, width))
            rationales = [str(g["rationale"]) for g in kept] if side == "query" else []
            yield (good, bad), (vectors, rationales, {g["position"]: str(g["error"]) for g in got if g["error"]})

    return encode_rows
