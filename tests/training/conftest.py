"""The training tests' data: a synthetic letter-mapping task, and a tiny base (no ``<emb>``) checkpoint."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from rge.testing import build_tiny_checkpoint

LETTERS, MAPPED = "abcdefghijkl", "ABCDEFGHIJKL"


def synthetic_split() -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Queries name three lower-case letters, documents the matching capitals: the model must learn
    the letter mapping, and held-out combinations test that it generalises beyond the training pairs."""
    combos = list(itertools.combinations(range(len(LETTERS)), 3))
    random.Random(0).shuffle(combos)
    return combos[:160], combos[160:]


def query_text(combo: tuple[int, ...]) -> str:
    return "find " + " ".join(LETTERS[i] for i in combo)


def document_text(combo: tuple[int, ...]) -> str:
    return " ".join(MAPPED[i] for i in combo)


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("synthetic") / "letters.jsonl"
    rows = [{"query": query_text(c), "positive": document_text(c), "rationale": "so " + document_text(c)}
            for c in synthetic_split()[0]]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def held_out_data(tmp_path_factory) -> Path:
    """Thirty held-out rows of the letter task (no rationale), for ``--eval-data``."""
    path = tmp_path_factory.mktemp("held-out") / "held-out.jsonl"
    rows = [{"query": query_text(c), "positive": document_text(c)} for c in synthetic_split()[1][:30]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory) -> Path:
    """Eight rows of one task: with a batch of 8, every step trains on the same batch (its loss falls)."""
    path = tmp_path_factory.mktemp("one-batch") / "rows.jsonl"
    rows = [{"query": f"find {c}", "positive": c.upper() * 3, "rationale": f"so {c.upper()}"} for c in "abcdefgh"]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def tiny_base_path(tmp_path_factory) -> Path:
    """Qwen2.5-VL-Instruct as published, tiny: 4.51.3 files, tied padded vocabulary, no ``<emb>``."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-base"), with_emb_token=False)
