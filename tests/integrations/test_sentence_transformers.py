"""The sentence-transformers model in sentence-transformers' own machinery: a pool of worker processes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from rge.integrations.sentence_transformers import to_sentence_transformer
from rge.testing import make_test_image

from ..conftest import load_tiny
from .vectors import assert_same_vectors

QUERIES = ["What is in the image?", "Which animal is on the left?"]
POOL_TIMEOUT = 240.0
"""Seconds one pooled call may take: each worker starts a fresh interpreter (torch, rge) before it embeds."""


def test_a_pool_of_processes_gives_the_vectors_of_one_process(tiny_path):
    """``start_multi_process_pool`` pickles the whole model into each worker: its threads, locks and decode cache
    stay behind, and both paths give the vectors one process gives."""
    model = to_sentence_transformer(load_tiny(tiny_path, "cpu"))  # its own: the pool puts it in shared memory
    items = [QUERIES[0], {"text": "Describe it.", "image": make_test_image(64, 48, seed=1)}, "cat"]
    methods = {"encode_query": model.encode_query, "encode_document": model.encode_document}
    expected = {name: method(items) for name, method in methods.items()}
    pool = model.start_multi_process_pool(["cpu", "cpu"])
    waiter = ThreadPoolExecutor(1)  # to bound the wait: a stuck worker fails the test instead of hanging it
    try:
        for name, method in methods.items():
            pooled = waiter.submit(method, items, pool=pool, chunk_size=1).result(timeout=POOL_TIMEOUT)
            assert_same_vectors(pooled, expected[name])
    finally:
        model.stop_multi_process_pool(pool)
        waiter.shutdown()
    assert not np.allclose(expected["encode_query"], expected["encode_document"], atol=1e-3)

