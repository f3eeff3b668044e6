"""Decode steps read the device once: which rows finished. Everything before that read (the forward, the
logits, the penalty, the choice, the rows' new state) stays on the device, with every KV-cache kind, so
the host can queue the next step's work without waiting; rows' results are copied after it."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rge import RGEEncoder
from rge.engine import batches as batches_module
from rge.engine.batches import DynamicBatches
from rge.engine.slot_batches import SlotBatches, StaticSlotBatches

from .conftest import BUDGET

SYNCING_OPS = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::masked_select"}
"""Operators that make the host wait for the device (on CUDA): a number or a shape that depends on data."""


def rge_caller() -> str:
    """The innermost function of rge's own code on the stack."""
    for frame in inspect.stack()[2:]:
        if "/rge/" in frame.filename.replace("\\", "/"):
            return frame.function
    return "?"


class Reads(TorchDispatchMode):
    """Records the rge function behind every operator that reads the device (and boolean-mask indexing)."""

    def __init__(self, reads: list[str]) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        masked = name == "aten::index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                               for i in (args[1] if len(args) > 1 else ()))  # fmt: skip
        if name in SYNCING_OPS or masked:
            self.reads.append(rge_caller())
        return func(*args, **(kwargs or {}))


@contextmanager
def device_reads() -> Iterator[list[str]]:
    """The rge functions that read the device while inside, in order (``tolist`` and ``cpu`` too)."""
    reads: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu")}

    def spy(name):
        def read(tensor, *args, **kwargs):
            reads.append(inspect.stack()[1].function)
            return originals[name](tensor, *args, **kwargs)

        return read

    for name in originals:
        setattr(torch.Tensor, name, spy(name))
    try:
        with Reads(reads):
            yield reads
    finally:
        for name in originals:
            delattr(torch.Tensor, name)  # (inherited: the base class's come back)


@pytest.mark.parametrize("kind", [DynamicBatches, SlotBatches, StaticSlotBatches])
def test_a_step_reads_the_device_once_before_its_results(encoder, mixed_items, monkeypatch, kind):
    name = {DynamicBatches: "dynamic", SlotBatches: "preallocated", StaticSlotBatches: "static"}[kind]
    cached = RGEEncoder(encoder.checkpoint, max_new_tokens=BUDGET, kv_cache=name)
    steps: list[tuple[int, list[str]]] = []
    original = kind.step

    def step(self, running):
        with device_reads() as reads:
            result = original(self, running)
        checks = ("_check_first_replay", "hidden_difference", "same_choices")  # once per graph, on CUDA
        steps.append((len(result[1]), [read for read in reads if read not in checks]))
        return result

    monkeypatch.setattr(kind, "step", step)
    texts, images = [t for t, _ in mixed_items], [i for _, i in mixed_items]
    cached.encode_query(texts, images=images, batch_size=4)
    quiet = [reads for finished, reads in steps if not finished]
    assert quiet and all(reads == ["read_finished"] for reads in quiet)  # one read: which rows finished
    for _, reads in steps:
        assert reads[0] == "read_finished", reads  # nothing read before it, results only after it
    assert any(finished for finished, _ in steps)


def test_the_penalty_ids_follow_each_row_in_every_cache_kind(encoder, mixed_items):
    """Each row's ids follow it through admission and compaction: rationales equal each query's own (batch
    invariance with the penalty on), for every cache kind."""
    texts, images = [t for t, _ in mixed_items], [i for _, i in mixed_items]
    alone = [encoder.encode_query([t], images=[i], return_rationales=True)[1].token_ids[0]
             for t, i in zip(texts, images)]  # fmt: skip
    assert encoder.generation_settings.repetition_penalty != 1.0
    for name in ("dynamic", "preallocated", "static"):
        cached = RGEEncoder(encoder.checkpoint, max_new_tokens=BUDGET, kv_cache=name)
        items = cached.prepare(texts, images, reason=True)
        assert cached.query_decoder(3, BUDGET).run(items).generated == alone, name


def test_read_finished_warns_once_per_step_when_top_p_would_sample():
    done, holds = torch.tensor([False, True]), torch.tensor([True, False])
    with pytest.warns(batches_module.RGEDecodingWarning, match="top_p"):
        assert batches_module.read_finished(done, holds) == [1]


def test_every_cache_kind_decodes_with_eager_attention_too(encoder, tiny_path, mixed_items, device):
    """Steps hand the model a prepared mask: additive for eager attention, boolean for sdpa."""
    from .conftest import load_tiny

    texts, images = [t for t, _ in mixed_items], [i for _, i in mixed_items]
    expected, rationales = encoder.encode_query(texts, images=images, batch_size=4, return_rationales=True)
    for name in ("dynamic", "preallocated", "static"):
        eager = load_tiny(tiny_path, device, attn_implementation="eager", kv_cache=name)
        got, got_rationales = eager.encode_query(texts, images=images, batch_size=4, return_rationales=True)
        assert got_rationales.token_ids == rationales.token_ids, name
        assert float((got * expected).sum(axis=1).min()) >= 0.9999, name


@pytest.mark.parametrize("name", ["dynamic", "preallocated", "static"])
def test_a_budget_of_one_token_matches_the_authors_algorithm(encoder, reference, mixed_items, name):
    """One token: the prefill chooses it and the only step feeds it (every row ends on the budget)."""
    from .test_candidates import cosine

    cached = RGEEncoder(encoder.checkpoint, max_new_tokens=1, kv_cache=name)
    texts, images = [t for t, _ in mixed_items], [i for _, i in mixed_items]
    result = cached.query_decoder(3, 1).run(cached.prepare(texts, images, reason=True))
    for row, (text, image) in enumerate(mixed_items):
        vector, tokens = reference.query(text, image, max_new_tokens=1)
        assert result.generated[row] == tokens and len(tokens) == 1, row
        assert cosine(result.embeddings[row], vector) >= 0.9999, row
