"""The decode stream: queries that arrive while others decode, or leave early, get exactly the result they
get alone (the authors' algorithm), with both KV caches."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rge import RGEEncoder
from rge.engine.kv_cache import SlotCache

from .conftest import BUDGET
from .test_candidates import cosine


@pytest.fixture(scope="module")
def reference_queries(reference, mixed_items):
    return [reference.query(text, image, max_new_tokens=BUDGET) for text, image in mixed_items]


@pytest.fixture(params=["dynamic", "preallocated", "static"])
def cached_encoder(request, encoder):
    return RGEEncoder(encoder.checkpoint, max_new_tokens=BUDGET, kv_cache=request.param)


def prepared(encoder, mixed_items):
    return encoder.prepare([t for t, _ in mixed_items], [i for _, i in mixed_items], reason=True)


def test_queries_arriving_at_any_step_match_the_authors_algorithm(cached_encoder, mixed_items, reference_queries):
    items = prepared(cached_encoder, mixed_items)
    # Shortest prompts first, so that later arrivals are longer than the cache was sized for.
    arrivals = sorted(range(len(items)), key=lambda i: len(items[i]))
    stream = cached_encoder.query_decoder(batch_size=4).stream()
    results, step, grown = {}, 0, []
    original = SlotCache.ensure_columns
    SlotCache.ensure_columns = lambda self, n: grown.append(n > self.capacity) or original(self, n)
    try:
        with torch.inference_mode():
            while arrivals or stream.busy:
                if arrivals and step % 3 == 0:  # one newcomer every third step, whatever is running
                    index = arrivals.pop(0)
                    stream.submit([(f"q{index}", items[index])])
                for query in stream.step():
                    assert query.key not in results
                    results[query.key] = query
                step += 1
    finally:
        SlotCache.ensure_columns = original
    assert len(results) == len(items)
    for index, (expected, tokens) in enumerate(reference_queries):
        assert results[f"q{index}"].token_ids == tokens, index
        assert cosine(results[f"q{index}"].embedding, expected) >= 0.9999, index
    if cached_encoder.kv_cache != "dynamic":
        assert any(grown)  # a longer newcomer made the preallocated buffers grow


def test_cancelled_queries_leave_and_the_others_are_unchanged(cached_encoder, mixed_items, reference_queries):
    items = prepared(cached_encoder, mixed_items)
    stream = cached_encoder.query_decoder(batch_size=3).stream()
    stream.submit((index, item) for index, item in enumerate(items))
    results = {}
    with torch.inference_mode():
        for query in stream.step():
            results[query.key] = query
        running_now = stream.running_keys
        cancelled = {running_now[0], len(items) - 1}  # one decoding, one still waiting
        assert len(items) - 1 not in running_now and stream.running == 3 and not results
        stream.cancel(cancelled)
        assert stream.running == 2 and stream.waiting == len(items) - 3 - 1
        assert sorted(stream.running_keys) == sorted(set(running_now) - cancelled)
        while stream.busy:
            for query in stream.step():
                results[query.key] = query
    assert set(results) == set(range(len(items))) - cancelled
    for index, query in results.items():
        expected, tokens = reference_queries[index]
        assert query.token_ids == tokens and cosine(query.embedding, expected) >= 0.9999, index


def test_a_stream_that_never_waits_admits_ready_queries_and_moves_its_window_past_cancelled_ones(encoder):
    """Without blocking (a server's stream), queries are admitted once their image patches are made; the
    prefetched window covers the next ``rows`` waiting queries and moves up when waiting ones are cancelled
    (else the queries behind them would never be prepared, and never admitted)."""
    from rge.testing import make_test_image

    images = [{"text": f"picture {n}", "image": make_test_image(60 + 7 * n, 50, seed=n)} for n in range(4)]
    items = encoder.prepare(images, reason=True)
    woken = threading.Event()
    stream = encoder.query_decoder(batch_size=2).stream(on_ready=woken.set)
    stream.submit((key, item) for key, item in zip("abcd", items))
    assert not any(item.image.ready() for item in items[2:])  # behind the window: not started
    stream.cancel(["a", "b"])
    assert woken.wait(30)
    deadline = time.monotonic() + 30
    while not stream.can_step:
        assert time.monotonic() < deadline, "the queries left waiting never became ready"
        time.sleep(0.01)
    results = {}
    with torch.inference_mode():
        while stream.busy:
            for query in stream.step():
                results[query.key] = query
            if not stream.can_step and stream.busy:
                time.sleep(0.01)
    expected = encoder.encode_query(images[2:])
    assert sorted(results) == ["c", "d"]
    assert all(cosine(results[key].embedding, vector) >= 0.9999 for key, vector in zip("cd", expected))
