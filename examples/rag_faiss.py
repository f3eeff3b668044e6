"""Retrieval over a mixed corpus of images and texts with RGE and FAISS.

Documents (texts and images) are embedded once on the cheap candidate path and indexed in FAISS;
queries reason first, then search. Prints each query's rationale and its best hits.

    pip install "rge-embeddings[examples]"   # or, in a clone: pip install -e ".[examples]"
    python examples/rag_faiss.py            # with MCG-NJU/RGE (downloads it once)
    python examples/rag_faiss.py --tiny     # offline, on a tiny random checkpoint
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
from PIL import Image, ImageDraw

from rge import RGEEncoder

TEXTS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "A red double-decker bus is a common sight on the streets of London.",
    "Honey bees communicate the location of flowers with a waggle dance.",
]
SHAPES = [
    ("a red circle", "red", "ellipse"),
    ("a blue square", "blue", "rectangle"),
    ("a green triangle", "green", "polygon"),
]
QUERIES = [
    "Which picture shows a round red shape?",
    "How do plants make their food?",
    "What landmark stands in Paris?",
]


def draw(colour: str, shape: str) -> Image.Image:
    """A plain picture of one coloured shape."""
    picture = Image.new("RGB", (336, 336), "white")
    pen = ImageDraw.Draw(picture)
    if shape == "polygon":
        pen.polygon([(168, 40), (40, 296), (296, 296)], fill=colour)
    else:
        getattr(pen, shape)((60, 60, 276, 276), fill=colour)
    return picture


@dataclass
class Hit:
    rank: int
    score: float
    document: str


def build_corpus() -> tuple[list[dict], list[str]]:
    """The documents as encoder items, and how each is shown in the results."""
    items = [{"text": text} for text in TEXTS] + [{"image": draw(colour, shape)} for _, colour, shape in SHAPES]
    labels = TEXTS + [f"[image: {label}]" for label, _, _ in SHAPES]
    return items, labels


def search(encoder: RGEEncoder, queries: Sequence[str], top_k: int = 3) -> tuple[list[list[Hit]], list[str]]:
    """Index the corpus on the candidate path, search it with reasoning queries."""
    items, labels = build_corpus()
    documents = encoder.encode_document(items)
    index = faiss.IndexFlatIP(documents.shape[1])  # unit vectors: inner product = cosine
    index.add(documents)
    query_vectors, rationales = encoder.encode_query(list(queries), return_rationales=True)
    scores, ids = index.search(np.ascontiguousarray(query_vectors), top_k)
    hits = [
        [Hit(rank + 1, float(score), labels[doc]) for rank, (score, doc) in enumerate(zip(row_scores, row_ids))]
        for row_scores, row_ids in zip(scores, ids)
    ]
    return hits, list(rationales)


def main(argv: Sequence[str] | None = None) -> list[list[Hit]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="MCG-NJU/RGE", help="hub id or local checkpoint directory")
    parser.add_argument("--tiny", action="store_true", help="use a tiny random checkpoint built offline")
    parser.add_argument("--top-k", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        if args.tiny:
            from rge.testing import build_tiny_checkpoint

            args.model = str(build_tiny_checkpoint(scratch))
        encoder = RGEEncoder.from_pretrained(args.model)
        hits, rationales = search(encoder, QUERIES, args.top_k)
    for query, rationale, row in zip(QUERIES, rationales, hits):
        print(f"\nquery:     {query}\nrationale: {rationale!r}")
        for hit in row:
            print(f"  {hit.rank}. {hit.score:.4f}  {hit.document}")
    return hits


if __name__ == "__main__":
    main()
