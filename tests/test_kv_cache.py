"""The preallocated KV cache: the same tokens and vectors as the authors' algorithm, through admission,
compaction, column moves and out-of-memory retries; only finished rows move when rows finish."""

from __future__ import annotations

import pytest
import torch

from rge import RGEEncoder, RGEInputError
from rge.engine.kv_cache import SlotCache, bucket_for
from rge.engine.slot_batches import SlotBatches

from .conftest import BUDGET
from .test_candidates import cosine


@pytest.fixture(scope="module")
def reference_queries(reference, mixed_items):
    return [reference.query(text, image, max_new_tokens=BUDGET) for text, image in mixed_items]


@pytest.fixture
def preallocated(encoder):
    return RGEEncoder(encoder.checkpoint, max_new_tokens=BUDGET, kv_cache="preallocated")


@pytest.fixture
def full_reserves(monkeypatch):
    """(rows, start) before and ``start`` after every ``SlotCache.reserve`` that found no room right of the
    used columns: it moves them to the left."""
    full: list[tuple[int, int, int]] = []
    original = SlotCache.reserve

    def reserve(self, columns):
        rows, start, no_room = self.rows, self.start, self.end + columns > self.capacity
        original(self, columns)
        if no_room:
            full.append((rows, start, self.start))

    monkeypatch.setattr(SlotCache, "reserve", reserve)
    return full


@pytest.mark.parametrize("kv_cache", ["preallocated", "static"])
@pytest.mark.parametrize("batch_size", [1, 3, 4, 10])
@pytest.mark.parametrize("admission", [True, False])
def test_matches_the_authors_algorithm(encoder, reference_queries, mixed_items, batch_size, admission, kv_cache):
    preallocated = RGEEncoder(encoder.checkpoint, max_new_tokens=BUDGET, kv_cache=kv_cache)
    texts, images = [t for t, _ in mixed_items], [i for _, i in mixed_items]
    tokenized = preallocated.prepare(texts, images, reason=True)
    result = preallocated.query_decoder(batch_size, BUDGET, admission=admission).run(tokenized)
    for row, (expected, tokens) in enumerate(reference_queries):
        assert result.generated[row] == tokens, row
        assert cosine(result.embeddings[row], expected) >= 0.9999, row


@pytest.mark.parametrize("kv_cache", ["preallocated", "static"])
def test_rows_whose_columns_move_left_when_the_buffers_fill_match_the_authors_algorithm(
    encoder, reference, mixed_items, kv_cache, full_reserves
):
    """Short rationales and admission keep two rows decoding past the columns the widest prompts were given:
    the used columns move to the left under running rows, and every query still gets the authors' result."""
    budget = 12
    cached = RGEEncoder(encoder.checkpoint, max_new_tokens=budget, kv_cache=kv_cache)
    texts, images = [t for t, _ in mixed_items], [i for _, i in mixed_items]
    result = cached.query_decoder(2, budget).run(cached.prepare(texts, images, reason=True))
    assert any(rows and start > 0 == moved_to for rows, start, moved_to in full_reserves), full_reserves
    for row, (text, image) in enumerate(mixed_items):
        expected, tokens = reference.query(text, image, max_new_tokens=budget)
        assert result.generated[row] == tokens, row
        assert cosine(result.embeddings[row], expected) >= 0.9999, row


def test_public_api_uses_it_and_equals_the_dynamic_cache(encoder, preallocated, mixed_items, monkeypatch):
    used = []
    monkeypatch.setattr(
        SlotBatches, "step", lambda self, *a, _step=SlotBatches.step, **k: used.append(1) or _step(self, *a, **k)
    )
    texts, images = [t for t, _ in mixed_items], [i for _, i in mixed_items]
    got, got_rationales = preallocated.encode_query(texts, images=images, batch_size=4, return_rationales=True)
    assert used
    expected, rationales = encoder.encode_query(texts, images=images, batch_size=4, return_rationales=True)
    assert encoder.kv_cache == "auto" and got_rationales.token_ids == rationales.token_ids
    assert min(cosine(a, b) for a, b in zip(got, expected)) >= 0.9999
    with pytest.raises(RGEInputError, match="kv_cache"):
        RGEEncoder(encoder.checkpoint, kv_cache="paged")


def test_compaction_moves_only_as_many_rows_as_finished():
    from types import SimpleNamespace

    config = SimpleNamespace(text_config=SimpleNamespace(hidden_size=8, num_attention_heads=2, num_key_value_heads=1,
                                                         num_hidden_layers=1, head_dim=4))  # fmt: skip
    cache = SlotCache(config, slots=6, capacity=10, dtype=torch.float32, device=torch.device("cpu"),
                      max_new_tokens=4, penalize=True)  # fmt: skip
    cache.rows, cache.start, cache.end = 6, 2, 5
    for row in range(6):
        cache.keys[0, row, 0, :, 0] = row
        cache.mask[row, 2:5] = 1
        cache.tokens[row], cache.output_rows[row], cache.positions[:, row] = 10 + row, 20 + row, 30 + row
        cache.token_ids[row] = 40 + row
    writes = []
    original = torch.Tensor.__setitem__

    def spy(tensor, index, value):
        if tensor.data_ptr() == cache.keys.data_ptr():
            writes.append(index)
        return original(tensor, index, value)

    torch.Tensor.__setitem__ = spy
    try:
        cache.compact([0, 2, 4, 5])  # rows 1 and 3 finished
    finally:
        torch.Tensor.__setitem__ = original
    moved = [0, 4, 2, 5]  # slots 1 and 3 took rows 4 and 5, whole: keys and state
    assert [int(cache.keys[0, row, 0, 2, 0]) for row in range(4)] == moved
    assert cache.tokens[:4].tolist() == [10 + row for row in moved]
    assert cache.output_rows[:4].tolist() == [20 + row for row in moved]
    assert cache.positions[0, :4].tolist() == [30 + row for row in moved]
    assert cache.token_ids[:4, 0].tolist() == [40 + row for row in moved]
    assert len(writes) == 1 and writes[0][1].tolist() == [1, 3]  # one write of the two holes, nothing else
    assert cache.rows == 4 and not cache.mask[4:].any()


def test_running_out_of_memory_while_growing_leaves_the_cache_whole(monkeypatch):
    from types import SimpleNamespace

    config = SimpleNamespace(text_config=SimpleNamespace(hidden_size=8, num_attention_heads=2, num_key_value_heads=1,
                                                         num_hidden_layers=1, head_dim=4))  # fmt: skip
    cache = SlotCache(config, slots=2, capacity=16, dtype=torch.float32, device=torch.device("cpu"),
                      max_new_tokens=4, penalize=True)  # fmt: skip
    cache.rows, cache.start, cache.end = 2, 3, 9
    torch.manual_seed(0)
    cache.keys.normal_(), cache.values.normal_(), cache.mask[:2, 3:9].fill_(1), cache.token_ids.fill_(5)
    before = {name: getattr(cache, name).clone() for name in ("keys", "values", "mask", "token_ids")}
    allocations, original = [], torch.Tensor.new_zeros

    def tight(tensor, *args, **kwargs):
        allocations.append(1)
        if len(allocations) > 1:  # the keys fit, the values do not
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "new_zeros", tight)
    with pytest.raises(torch.OutOfMemoryError):
        cache.ensure_columns(40)
    monkeypatch.undo()
    assert (cache.capacity, cache.start, cache.end) == (16, 3, 9)
    for name, tensor in before.items():
        assert torch.equal(getattr(cache, name), tensor), name
    cache.ensure_columns(40)  # and it grows whole once memory allows
    assert cache.capacity >= 40 and (cache.start, cache.end) == (0, 6)
    assert torch.equal(cache.keys[:, :2, :, :6], before["keys"][:, :2, :, 3:9])


@pytest.mark.parametrize("limit", [1, 3])
def test_out_of_memory_retries_give_the_same_result(preallocated, mixed_items, monkeypatch, limit):
    texts, images = [t for t, _ in mixed_items], [i for _, i in mixed_items]
    expected, expected_rationales = preallocated.encode_query(
        texts, images=images, batch_size=8, return_rationales=True
    )
    faults, original = [], preallocated.model.model.forward

    def forward(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > limit:
            faults.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return original(*args, **kwargs)

    monkeypatch.setattr(preallocated.model.model, "forward", forward)
    got, rationales = preallocated.encode_query(texts, images=images, batch_size=8, return_rationales=True)
    assert faults and rationales.token_ids == expected_rationales.token_ids
    assert min(cosine(a, b) for a, b in zip(got, expected)) >= 0.9999


def test_static_steps_have_bucketed_rows_and_the_whole_capacity(encoder, mixed_items, monkeypatch):
    """Fixed shapes are what a CUDA graph needs: rows padded to a bucket, attention over every column."""
    static = RGEEncoder(encoder.checkpoint, max_new_tokens=BUDGET, kv_cache="static")
    language_model = static.model.model.language_model
    shapes, original = [], language_model.forward

    def recorded(*args, **kwargs):
        cache, ids = kwargs["past_key_values"], kwargs.get("input_ids")
        if ids is not None and cache.static_rows is not None:  # a decode step (prefill passes embeddings)
            shapes.append((ids.shape[0], kwargs["attention_mask"].shape, cache.capacity, cache.rows,
                           cache.mask.shape[0]))  # fmt: skip
        return original(*args, **kwargs)

    monkeypatch.setattr(language_model, "forward", recorded)
    texts, images = [t for t, _ in mixed_items], [i for _, i in mixed_items]
    static.encode_query(texts, images=images, batch_size=6, show_progress_bar=False)
    assert shapes
    for bucket, mask_shape, capacity, rows, slots in shapes:
        assert slots == 8  # 6 rows asked for, rounded up to a bucket
        assert bucket == bucket_for(rows, slots) and bucket >= rows
        assert mask_shape == (bucket, 1, 1, capacity)
    assert any(bucket > rows for bucket, _, _, rows, _ in shapes)  # some steps ran padded rows
    assert [bucket_for(n, 64) for n in (1, 3, 5, 17, 33, 50, 64)] == [1, 4, 8, 32, 48, 64, 64]
