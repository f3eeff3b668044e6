"""The encoder's decode cache is reused across calls (with its fixed-shape step, and so its CUDA graphs),
lent to one decode at a time, replaced when it does not fit; and caches are freed when they should be: a
long-lived stream keeps at most the pool's one, and ``release_decode_cache()`` frees it at once (without
the cycle collector: nothing refers back to a cache)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from rge import RGEEncoder
from rge.engine.cache_pool import SlotCachePool
from rge.engine.kv_cache import SlotCache

from .conftest import BUDGET


@pytest.fixture
def static(encoder):
    return RGEEncoder(encoder.checkpoint, max_new_tokens=BUDGET, kv_cache="static")


@contextmanager
def live_caches() -> Iterator[list[weakref.ref]]:
    """Weak references to every ``SlotCache`` made inside, the cycle collector off meanwhile."""
    made: list[weakref.ref] = []
    original = SlotCache.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(weakref.ref(self))

    SlotCache.__init__ = init  # type: ignore[method-assign]
    gc.disable()
    try:
        yield made
    finally:
        gc.enable()
        SlotCache.__init__ = original  # type: ignore[method-assign]


def alive(made: list[weakref.ref]) -> int:
    return sum(reference() is not None for reference in made)


@pytest.fixture
def taken(monkeypatch) -> list[SlotCache]:
    """Every cache a ``SlotCachePool`` hands to a decode, in order."""
    caches: list[SlotCache] = []
    original = SlotCachePool.take

    def take(self, *args, **kwargs):
        caches.append(original(self, *args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(SlotCachePool, "take", take)
    return caches


def test_a_second_call_reuses_the_cache_and_its_step(static, mixed_items, taken):
    texts, images = [t for t, _ in mixed_items], [i for _, i in mixed_items]
    first = static.encode_query(texts, images=images, batch_size=4, return_rationales=True)
    cache = taken[0]
    step = cache.step
    assert step is not None and step.serves(step.config, step.choice)
    second = static.encode_query(texts, images=images, batch_size=4, return_rationales=True)
    assert len(taken) >= 2 and all(other is cache for other in taken) and cache.step is step  # kept between calls
    assert first[1].token_ids == second[1].token_ids and np.array_equal(first[0], second[0])
    static.release_decode_cache()
    static.encode_query(texts[:2], batch_size=4)
    assert taken[-1] is not cache


def test_the_pool_lends_its_cache_to_one_decode_and_replaces_a_misfit(encoder):
    model, pool = encoder.model, SlotCachePool()
    sizes = {"dtype": torch.float32, "device": torch.device("cpu"), "max_new_tokens": 8, "penalize": False}

    def take(slots, columns, **changed):
        settings = {**sizes, **changed}
        return pool.take(model, slots, columns, settings.pop("dtype"), settings.pop("device"), **settings)

    cache = take(5, 300)
    assert cache.slots == 8 and cache.capacity == 384  # a bucket; rounded columns
    assert take(5, 300) is not cache  # lent out: another decode gets its own
    cache.rows, cache.end = 3, 40
    pool.give_back(cache)
    again = take(7, 200)
    assert again is cache and (cache.rows, cache.end, int(cache.mask.sum())) == (0, 0, 0)  # emptied
    pool.give_back(cache)
    assert take(1, 300) is cache  # more slots than asked for cost nothing: steps run a bucket of the rows
    for misfit in ({"columns": 100}, {"slots": 9}, {"columns": 500}, {"max_new_tokens": 16}, {"penalize": True}):
        pool.give_back(cache)
        slots, columns = misfit.pop("slots", 8), misfit.pop("columns", 300)
        assert take(slots, columns, **misfit) is not cache, misfit


def test_growth_rounds_the_capacity(encoder):
    cache = SlotCachePool().take(encoder.model, 2, 100, torch.float32, torch.device("cpu"), max_new_tokens=8,
                                 penalize=True)  # fmt: skip
    assert cache.capacity == 128
    cache.rows, cache.start, cache.end = 2, 20, 60
    cache.token_ids[:2] = torch.tensor([[7], [9]])
    cache.ensure_columns(1000)
    assert cache.capacity == 1024  # not 1000: sdpa would pad its mask every step
    assert set(cache.token_ids[0].tolist()) == {7} and set(cache.token_ids[1].tolist()) == {9}  # own ids only


def test_a_batch_emptied_by_cancellation_returns_its_cache(static, mixed_items, taken):
    texts = [text for text, image in mixed_items if image is None][:3]
    stream = static.query_decoder(batch_size=4).stream()
    stream.submit(enumerate(static.prepare(texts, reason=True)))
    stream.step()
    (lent,) = taken
    assert stream.running == 3
    static.encode_query(texts[:1])  # meanwhile another decode gets a cache of its own
    assert len(taken) == 2 and taken[1] is not lent
    stream.cancel([0, 1, 2])
    assert not stream.busy
    static.encode_query(texts[:1])  # the next decode gets the cache the cancelled batch gave back
    assert len(taken) == 3 and taken[2] is lent


def test_a_long_lived_stream_keeps_one_cache_and_release_frees_it_at_once(static, mixed_items):
    """Queries of alternating prompt widths through one stream (as a server keeps it) used to leave a cache
    alive per width; the cache's layers held the cache, so a dropped one lived until a collection."""
    texts = [text for text, image in mixed_items if image is None]
    items = static.prepare([texts[n % len(texts)] * (1 + 6 * (n % 2)) for n in range(16)], reason=True)
    with live_caches() as made:
        stream = static.query_decoder(batch_size=2).stream()
        for start in range(0, len(items), 2):
            stream.submit((start + n, item) for n, item in enumerate(items[start : start + 2]))
            with torch.inference_mode():
                while stream.busy:
                    stream.step()
        assert len(made) >= 1 and alive(made) == 1  # the pool's, kept for the next decode
        kept = next(cache for cache in (reference() for reference in made) if cache is not None)
        held, kept_bytes = allocated(static.device), kept.keys.nbytes + kept.values.nbytes
        del kept
        static.release_decode_cache()
        assert alive(made) == 0  # freed now, with the cycle collector off
        if static.device.type == "cuda":  # and so are its bytes (keys and values at least)
            assert allocated(static.device) <= held - kept_bytes


def allocated(device: torch.device) -> int:
    """Bytes the caching allocator has handed out on ``device`` (0 off CUDA)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    return int(torch.cuda.memory_allocated(device))
