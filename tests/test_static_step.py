"""Fixed-shape decode steps: the default on CUDA, flash-attention's KV-cache kernel called with each row's
window, and CUDA-graph replays checked against the eager step (a bad or failed graph falls back)."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

from rge import RGEEncoder
from rge.engine import decode_attention, static_step
from rge.engine.slot_decoder import DECODERS, StaticSlotDecoder, resolve_kv_cache
from rge.engine.static_step import StaticDecodeStep

from .conftest import BUDGET
from .test_candidates import cosine


@pytest.fixture(scope="module")
def expected(reference, mixed_items):
    return [reference.query(text, image, max_new_tokens=BUDGET) for text, image in mixed_items]


def encode_static(encoder, mixed_items, batch_size=4):
    static = RGEEncoder(encoder.checkpoint, max_new_tokens=BUDGET, kv_cache="static")
    texts, images = [t for t, _ in mixed_items], [i for _, i in mixed_items]
    return static.encode_query(texts, images=images, batch_size=batch_size, return_rationales=True)


def assert_same(result, expected):
    embeddings, rationales = result
    for row, (vector, tokens) in enumerate(expected):
        assert rationales.token_ids[row] == tokens, row
        assert cosine(embeddings[row], vector) >= 0.9999, row


def test_auto_is_static_on_cuda_and_dynamic_elsewhere():
    assert DECODERS[resolve_kv_cache("auto", torch.device("cuda"))] is StaticSlotDecoder
    assert resolve_kv_cache("auto", torch.device("cpu")) == "dynamic"
    assert resolve_kv_cache("preallocated", torch.device("cuda")) == "preallocated"


def flash_kvcache_as_documented(calls):
    """flash_attn_with_kvcache's documented semantics for one-token queries, in torch: row b of q
    (B, 1, H, D) attends to k_cache/v_cache (B, C, Hk, D) columns [cache_leftpad[b], cache_seqlens[b])."""

    def kernel(q, k_cache, v_cache, *, cache_seqlens, cache_leftpad, softmax_scale, causal):
        assert cache_seqlens.dtype == cache_leftpad.dtype == torch.int32 and causal
        assert q.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1  # the kernel's layout check
        calls.append(q.shape)
        groups = q.shape[2] // k_cache.shape[2]
        keys, values = (t.repeat_interleave(groups, dim=2) for t in (k_cache, v_cache))
        scores = torch.einsum("bqhd,bchd->bhqc", q, keys) * softmax_scale
        columns = torch.arange(k_cache.shape[1])
        visible = (columns >= cache_leftpad[:, None]) & (columns < cache_seqlens[:, None])
        scores = scores.masked_fill(~visible[:, None, None, :], -torch.inf)
        return torch.einsum("bhqc,bchd->bqhd", scores.softmax(dim=-1), values)

    return kernel


def test_flash_kernel_is_called_with_each_rows_window(encoder, mixed_items, expected, monkeypatch):
    """Here the model runs sdpa, whose registered function the dispatch wraps (restored afterwards):
    prefill goes through it unchanged, decode steps to the kernel."""
    calls, mapping = [], AttentionInterface._global_mapping
    monkeypatch.setitem(mapping, "sdpa", mapping["sdpa"])
    monkeypatch.setattr(decode_attention, "flash_kvcache_kernel", lambda: flash_kvcache_as_documented(calls))
    monkeypatch.setattr(static_step, "uses_flash_kernel", lambda *args: True)
    assert_same(encode_static(encoder, mixed_items), expected)
    layers = encoder.model.config.text_config.num_hidden_layers
    assert len(calls) > layers and len(calls) % layers == 0  # every layer of every decode step
    wrapped = mapping["sdpa"]
    decode_attention.install_flash_dispatch("sdpa")
    assert mapping["sdpa"] is wrapped and wrapped.rge_wrapped is not wrapped  # wrapped once


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    """Let the step take its graph path on CPU, with ``capture`` standing in for CUDA-graph capture."""

    def install(capture):
        original = StaticDecodeStep.__init__

        def init(self, *args, **kwargs):
            original(self, *args, **kwargs)
            self.graphs = True

        monkeypatch.setattr(StaticDecodeStep, "__init__", init)
        monkeypatch.setattr(StaticDecodeStep, "_capture", capture)

    return install


def test_a_faithful_graph_is_checked_once_then_replayed(encoder, mixed_items, expected, graphs_on_cpu, recwarn):
    replays, steps = [], []

    def capture(self, bucket):
        output = torch.empty(bucket, encoder.model.config.text_config.hidden_size)
        steps.append(self)
        return (lambda: replays.append(1) or output.copy_(self._forward(bucket))), output

    graphs_on_cpu(capture)
    assert_same(encode_static(encoder, mixed_items), expected)
    assert replays and all(step.graphs and step._verified == set(step._captured) for step in steps)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_a_wrong_replay_falls_back_to_eager_steps(encoder, mixed_items, expected, graphs_on_cpu):
    def capture(self, bucket):
        output = torch.zeros(bucket, encoder.model.config.text_config.hidden_size)
        return (lambda: output.fill_(1.0)), output  # a graph that baked in the wrong values

    graphs_on_cpu(capture)
    with pytest.warns(RuntimeWarning, match="differs from the eager step"):
        result = encode_static(encoder, mixed_items)
    assert_same(result, expected)


def test_a_failed_capture_falls_back_to_eager_steps(encoder, mixed_items, expected, graphs_on_cpu):
    def capture(self, bucket):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs_on_cpu(capture)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        result = encode_static(encoder, mixed_items)
    assert_same(result, expected)


@pytest.mark.parametrize("leftpad", [True, False])
def test_flash_kernel_is_used_only_when_loaded_with_it_on_cuda_in_half_precision(monkeypatch, leftpad):
    import sys
    import types

    def kernel(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, cache_leftpad=None, softmax_scale=None):
        raise AssertionError("never called")

    def old_kernel(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, softmax_scale=None):
        raise AssertionError("never called")

    module = types.SimpleNamespace(flash_attn_with_kvcache=kernel if leftpad else old_kernel)
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setattr(decode_attention.importlib.util, "find_spec", lambda name: object())
    decode_attention.flash_kvcache_kernel.cache_clear()

    def uses(implementation, device, dtype):
        model = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation=implementation))
        return decode_attention.uses_flash_kernel(model, torch.device(device), dtype)

    try:
        assert uses("flash_attention_2", "cuda", torch.bfloat16) is leftpad  # flash-attention < 2.6: sdpa steps
        assert not uses("sdpa", "cuda", torch.bfloat16)
        assert not uses("flash_attention_2", "cpu", torch.bfloat16)
        assert not uses("flash_attention_2", "cuda", torch.float32)
    finally:
        decode_attention.flash_kvcache_kernel.cache_clear()
