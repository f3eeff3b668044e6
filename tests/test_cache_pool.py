"""The encoder's decode cache is reused across calls (its fixed-shape step, and so its CUDA graphs, too),
lent to one decode at a time, and replaced when it does not fit."""

from __future__ import annotations

import numpy as np
import torch

from rge import RGEEncoder
from rge.engine.cache_pool import SlotCachePool
from rge.engine.slot_decoder import StaticSlotDecoder

from .conftest import BUDGET


def test_a_second_call_reuses_the_cache_and_its_step(encoder, mixed_items, monkeypatch):
    static = RGEEncoder(encoder.checkpoint, max_new_tokens=BUDGET, kv_cache="static")
    steps = []
    original = StaticSlotDecoder._decode_forward

    def recorded(self, running):
        hidden = original(self, running)
        steps.append((running.cache, self._steps[running.cache]))
        return hidden

    monkeypatch.setattr(StaticSlotDecoder, "_decode_forward", recorded)
    texts, images = [t for t, _ in mixed_items], [i for _, i in mixed_items]
    first = static.encode_query(texts, images=images, batch_size=4, return_rationales=True)
    used_first = set(steps)
    steps.clear()
    second = static.encode_query(texts, images=images, batch_size=4, return_rationales=True)
    assert set(steps) == used_first and len(used_first) == 1  # one cache and step, kept between calls
    assert first[1].token_ids == second[1].token_ids and np.array_equal(first[0], second[0])
    static.release_decode_cache()
    steps.clear()
    static.encode_query(texts[:2], batch_size=4)
    assert {cache for cache, _ in steps}.isdisjoint(cache for cache, _ in used_first)


def test_the_pool_lends_its_cache_to_one_decode_and_replaces_a_misfit(encoder):
    model, pool = encoder.model, SlotCachePool()
    cpu, fp32 = torch.device("cpu"), torch.float32
    cache, step = pool.take(model, 5, 300, fp32, cpu)
    assert step is None and cache.mask.shape[0] == 8 and cache.capacity == 384  # a bucket; rounded columns
    assert pool.take(model, 5, 300, fp32, cpu)[0] is not cache  # lent out: another decode gets its own
    cache.rows, cache.end = 3, 40
    pool.give_back(cache, None)
    again, _ = pool.take(model, 7, 200, fp32, cpu)
    assert again is cache and (cache.rows, cache.end, int(cache.mask.sum())) == (0, 0, 0)  # emptied
    pool.give_back(cache, None)
    assert pool.take(model, 7, 100, fp32, cpu)[0] is not cache  # 384 columns for 100: too wide
    pool.give_back(cache, None)
    assert pool.take(model, 9, 300, fp32, cpu)[0] is not cache  # another bucket (16 slots)
    pool.give_back(cache, None)
    assert pool.take(model, 8, 500, fp32, cpu)[0] is not cache  # too narrow


def test_a_batch_emptied_by_cancellation_returns_its_cache(encoder, mixed_items):
    static = RGEEncoder(encoder.checkpoint, max_new_tokens=BUDGET, kv_cache="static")
    stream = static.query_decoder(batch_size=4).stream()
    items = static.prepare([{"text": text} for text, image in mixed_items if image is None][:3], reason=True)
    stream.submit(enumerate(items))
    stream.step()
    cache = stream._running.cache
    assert static._cache_pool._idle is None  # lent to the running batch
    stream.cancel([0, 1, 2])
    assert not stream.busy and static._cache_pool._idle[0] is cache
