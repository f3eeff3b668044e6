"""Fixed-shape decode steps: the default on CUDA, flash-attention's KV-cache kernel called with each row's
window (sdpa where flash-attention is older than 2.6), CUDA graphs captured on the cache's device and
their first replay checked against the eager step (a bad or failed graph falls back; running out of
memory while capturing is the stream's to handle)."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import AttentionInterface

from rge import RGEEncoder
from rge.engine import decode_attention, static_step
from rge.engine.kv_cache import bucket_for
from rge.engine.slot_batches import BATCHES, StaticSlotBatches, resolve_kv_cache
from rge.engine.static_step import CudaGraphs, GraphFallbackWarning, StaticDecodeStep
from rge.engine.transformers_internals import registered_attention

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
    assert BATCHES[resolve_kv_cache("auto", torch.device("cuda"))] is StaticSlotBatches
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
        columns = torch.arange(k_cache.shape[1], device=k_cache.device)
        visible = (columns >= cache_leftpad[:, None]) & (columns < cache_seqlens[:, None])
        scores = scores.masked_fill(~visible[:, None, None, :], -torch.inf)
        return torch.einsum("bhqc,bchd->bqhd", scores.softmax(dim=-1), values)

    return kernel


@pytest.fixture
def flash_loaded(monkeypatch):
    """The model as if loaded with flash-attention: decode steps carry their window, through the dispatch
    wrapped around sdpa's registered function (restored afterwards); returns the calls that function got."""
    mapping, calls = AttentionInterface._global_mapping, []
    original = mapping["sdpa"]

    def recorded(module, query, *args, **kwargs):
        calls.append(query.shape)
        return original(module, query, *args, **kwargs)

    monkeypatch.setitem(mapping, "sdpa", recorded)
    monkeypatch.setattr(static_step, "loaded_with_flash", lambda language_model: True)
    return calls


def test_flash_kernel_is_called_with_each_rows_window(encoder, mixed_items, expected, flash_loaded, monkeypatch):
    """Prefill goes through the wrapped function unchanged, every layer of every decode step to the kernel."""
    kernel_calls = []
    monkeypatch.setattr(decode_attention, "kvcache_kernel_for", lambda query: flash_kvcache_as_documented(kernel_calls))
    assert_same(encode_static(encoder, mixed_items), expected)
    layers = encoder.model.config.text_config.num_hidden_layers
    assert len(kernel_calls) > layers and len(kernel_calls) % layers == 0
    assert all(shape[2] > 1 for shape in flash_loaded)  # the wrapped function saw prefills only
    wrapped = registered_attention("sdpa")
    decode_attention.install_flash_dispatch("sdpa")
    assert registered_attention("sdpa") is wrapped and wrapped.rge_wrapped is not wrapped  # once


def test_flash_attention_older_than_2_6_gets_sdpa_steps(encoder, mixed_items, expected, flash_loaded, monkeypatch):
    """Without the kernel's ``cache_leftpad``, decode steps run sdpa with the window as a mask; transformers'
    flash wrapper (a 2-D padding mask only) never sees one."""
    monkeypatch.setattr(decode_attention, "kvcache_kernel_for", lambda query: None)
    sdpa_calls = []
    from transformers.integrations import sdpa_attention

    original = sdpa_attention.sdpa_attention_forward

    def counted(module, query, key, value, attention_mask, **kwargs):
        sdpa_calls.append(attention_mask.shape)
        return original(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", counted)
    assert_same(encode_static(encoder, mixed_items), expected)
    assert sdpa_calls and all(len(shape) == 4 for shape in sdpa_calls)
    assert all(shape[2] > 1 for shape in flash_loaded)  # the wrapped function saw prefills only


@pytest.mark.parametrize("leftpad", [True, False])
def test_the_kernel_is_used_only_on_cuda_in_half_precision_from_2_6(monkeypatch, leftpad):
    import sys

    def kernel(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, cache_leftpad=None, softmax_scale=None):
        raise AssertionError("never called")

    def old_kernel(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, softmax_scale=None):
        raise AssertionError("never called")

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_with_kvcache=kernel if leftpad
                                                                          else old_kernel))  # fmt: skip
    monkeypatch.setattr(decode_attention.importlib.util, "find_spec", lambda name: object())
    decode_attention.flash_kvcache_kernel.cache_clear()
    try:
        for is_cuda, dtype, used in ((True, torch.bfloat16, leftpad), (True, torch.float16, leftpad),
                                     (True, torch.float32, False), (False, torch.bfloat16, False)):  # fmt: skip
            query = types.SimpleNamespace(is_cuda=is_cuda, dtype=dtype)
            assert (decode_attention.kvcache_kernel_for(query) is not None) is used
    finally:
        decode_attention.flash_kvcache_kernel.cache_clear()
    model = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="flash_attention_2"))
    assert decode_attention.loaded_with_flash(model)
    assert not decode_attention.loaded_with_flash(types.SimpleNamespace(config=types.SimpleNamespace(
        _attn_implementation="sdpa")))  # fmt: skip


class FakeGraphs:
    """Stands in for ``CudaGraphs`` on the CPU: ``replay_of(step, cache, bucket, run)`` is what a capture
    gives (``run`` is the eager step, as a faithful graph would replay it)."""

    inside = False  # whether a replay is running now (any fake's)

    def __init__(self, replay_of, step, cache):
        self.replay_of, self.step, self.cache, self.captures, self.replays = replay_of, step, cache, 0, 0

    def capture(self, run, restore):
        self.captures += 1
        for _ in range(2):  # warm-ups, as CudaGraphs runs them: each undone by restore
            run()
            restore()
        bucket = bucket_for(self.cache.rows, self.cache.slots)  # the rows the step runs (a graph per bucket)
        replay = self.replay_of(self.step, self.cache, bucket, run)

        def counted():
            self.replays += 1
            FakeGraphs.inside = True
            try:
                replay()
            finally:
                FakeGraphs.inside = False

        return counted


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    """Let steps take their graph path on CPU with ``FakeGraphs(replay_of)``; returns the fakes made."""
    made = []

    def install(replay_of):
        original_init = StaticDecodeStep.__init__

        def init(self, model, cache, *args, **kwargs):  # a step belongs to one cache
            original_init(self, model, cache, *args, **kwargs)
            self.graphs = FakeGraphs(replay_of, self, cache)
            made.append(self.graphs)

        monkeypatch.setattr(StaticDecodeStep, "__init__", init)
        return made

    return install


def faithful(step, cache, bucket, run):
    return run


def test_a_faithful_graph_is_checked_once_then_replayed(encoder, mixed_items, expected, graphs_on_cpu, recwarn,
                                                        monkeypatch):  # fmt: skip
    """The graph is the whole step: the logits, the penalty and the choice run inside every replay; outside,
    only the eager step right after a capture and the eager half of each first-replay check compute them."""
    made = graphs_on_cpu(faithful)
    scored = {"inside": 0, "outside": 0}
    original = static_step.penalized_scores

    def counted(*args):
        scored["inside" if FakeGraphs.inside else "outside"] += 1
        return original(*args)

    monkeypatch.setattr(static_step, "penalized_scores", counted)
    assert_same(encode_static(encoder, mixed_items), expected)
    assert made and all(graphs.replays > graphs.captures > 0 for graphs in made)
    captures, replays = sum(graphs.captures for graphs in made), sum(graphs.replays for graphs in made)
    assert scored["inside"] == replays and scored["outside"] <= 4 * captures < replays
    assert not [w for w in recwarn if issubclass(w.category, GraphFallbackWarning)]


def test_a_replay_with_wrong_states_falls_back_to_eager_steps(encoder, mixed_items, expected, graphs_on_cpu):
    def baked(step, cache, bucket, run):
        return lambda: (run(), step.hidden.fill_(1.0))  # a graph that baked in the wrong values

    graphs_on_cpu(baked)
    with pytest.warns(GraphFallbackWarning, match="differs from the eager step"):
        result = encode_static(encoder, mixed_items)
    assert_same(result, expected)


def test_a_replay_with_other_tokens_falls_back_to_eager_steps(encoder, mixed_items, expected, graphs_on_cpu):
    """Hidden states alike are not enough: a replay must also choose the eager step's tokens."""

    def other_tokens(step, cache, bucket, run):
        return lambda: (run(), cache.tokens[:bucket].add_(1))

    graphs_on_cpu(other_tokens)
    with pytest.warns(GraphFallbackWarning, match="its chosen tokens"):
        result = encode_static(encoder, mixed_items)
    assert_same(result, expected)


def test_a_window_one_column_off_fails_the_replay_check(encoder, graphs_on_cpu):
    """The check is tight enough to see a graph whose rows leave out their first column, even in a long
    prompt where one column of 800 moves the hidden states by 7e-4 to 2.4e-3 on average."""

    def shifted(step, cache, bucket, run):
        def replay():
            mask = cache.mask[:bucket].clone()
            cache.mask[torch.arange(bucket), mask.int().argmax(dim=1)] = 0
            try:
                run()
            finally:
                cache.mask[:bucket] = mask

        return replay

    static = RGEEncoder(encoder.checkpoint, max_new_tokens=8, kv_cache="static")
    query = " ".join(["word"] * 800)
    expected = static.encode_query(query, return_rationales=True)
    static.release_decode_cache()  # (its step has no graphs: the next call makes one that has)
    graphs_on_cpu(shifted)
    with pytest.warns(GraphFallbackWarning, match="differs from the eager step"):
        got = static.encode_query(query, return_rationales=True)
    assert got[1] == expected[1] and cosine(got[0], expected[0]) >= 0.9999


def test_a_failed_capture_falls_back_to_eager_steps(encoder, mixed_items, expected, graphs_on_cpu):
    def fails(step, cache, bucket, run):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs_on_cpu(fails)
    with pytest.warns(GraphFallbackWarning, match="capture failed"):
        result = encode_static(encoder, mixed_items)
    assert_same(result, expected)


def test_out_of_memory_while_capturing_reaches_the_streams_retry(encoder, mixed_items, expected, graphs_on_cpu,
                                                                 recwarn, caplog):  # fmt: skip
    faults = []

    def tight(step, cache, bucket, run):
        if bucket > 2 and not faults:
            faults.append(bucket)
            raise torch.OutOfMemoryError("CUDA out of memory (injected while capturing)")
        return run

    made = graphs_on_cpu(tight)
    with caplog.at_level("WARNING", logger="rge.engine"):
        assert_same(encode_static(encoder, mixed_items, batch_size=8), expected)
    assert faults and not [w for w in recwarn if issubclass(w.category, GraphFallbackWarning)]
    assert any(graphs.replays for graphs in made)  # graphs stayed on after the retry
    assert sum("out of memory" in record.message for record in caplog.records) == 1  # said once


def test_graphs_are_captured_on_the_caches_device(monkeypatch):
    """Whatever device is current, the side stream, the streams waited on and the memory pool are the
    cache's (an encoder on cuda:1 must not capture on cuda:0)."""
    seen: list[tuple[str, object]] = []
    current = {"device": 0}

    class Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            self.previous, current["device"] = current["device"], torch.device(self.device).index

        def __exit__(self, *exc):
            current["device"] = self.previous

    class Stream:
        def __init__(self, device=None):  # torch's default: the current device
            self.device = current["device"] if device is None else torch.device(device).index
            seen.append(("stream", self.device))

        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            pass

    class Capture:
        def __init__(self, graph, pool=None, stream=None, capture_error_mode="global"):
            seen.append(("graph pool", pool))
            seen.append(("capture stream", stream.device))
            assert capture_error_mode == "thread_local"  # input workers may go on meanwhile

        def __enter__(self):
            seen.append(("capture on", current["device"]))

        def __exit__(self, *exc):
            pass

    fake = types.SimpleNamespace(
        device=Device, Stream=Stream, CUDAGraph=Graph, graph=Capture,
        stream=lambda stream: Device(f"cuda:{current['device']}"),
        current_stream=lambda device=None: seen.append(("current", current["device"] if device is None
                                                        else torch.device(device).index)) or Stream(device),
        graph_pool_handle=lambda: ("pool of", current["device"]),
    )  # fmt: skip
    monkeypatch.setattr(static_step.torch, "cuda", fake)
    runs = []
    CudaGraphs(torch.device("cuda:1")).capture(lambda: runs.append(current["device"]), lambda: None)
    assert runs == [1, 1, 1]  # two warm-ups and the captured run, all on device 1
    assert {index for kind, index in seen if kind in ("stream", "current", "capture on", "capture stream")} == {1}
    assert ("graph pool", ("pool of", 1)) in seen
