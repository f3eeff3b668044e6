"""The vision tower's windows in few attention calls: the outputs of transformers' own per-window loop, bit
for bit, with a call per distinct window length instead of per window; flash-attention models untouched."""

from __future__ import annotations

import types

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

from rge.engine.vision_attention import WindowBatchedVisionAttention, batch_windows
from rge.testing import make_test_image


@pytest.fixture(scope="module")
def wide(tiny_path, device):
    """The paper's pixel budget (256 to 1,024 visual tokens): many windows per image."""
    from rge import RGEEncoder

    return RGEEncoder.from_pretrained(tiny_path, device=device, dtype="float32")


@pytest.fixture
def attention_calls(monkeypatch):
    calls = []
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def counted(*args, **kwargs):
        calls.append(args[1].shape[0])  # windows in the call
        return original(*args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", counted)
    return calls


def tower_output(encoder, images):
    items = encoder.prepare([{"text": "x", "image": image} for image in images], reason=False)
    batch = encoder.model_batch(items)
    with torch.inference_mode():
        output = encoder.model.model.visual(batch.pixel_values, grid_thw=batch.image_grid_thw)
    return output.pooler_output if hasattr(output, "pooler_output") else output


@pytest.mark.parametrize("sizes", [[(560, 392)], [(1036, 840)], [(90, 60), (300, 200), (28, 500)]])
def test_the_same_outputs_as_transformers_loop_in_few_calls(wide, attention_calls, sizes):
    encoder = wide
    images = [make_test_image(*size, seed=n) for n, size in enumerate(sizes)]
    modules = [m for m in encoder.model.modules() if isinstance(m, qwen.Qwen2_5_VLVisionAttention)]
    assert modules and all(type(m) is WindowBatchedVisionAttention for m in modules)  # batched when it loaded
    batched = tower_output(encoder, images)
    batched_calls = len(attention_calls)
    for module in modules:
        module.__class__ = qwen.Qwen2_5_VLVisionAttention  # transformers' own forward, with its loop
    try:
        attention_calls.clear()
        looped = tower_output(encoder, images)
        looped_calls = len(attention_calls)
    finally:
        assert batch_windows(encoder.model) == len(modules)
    assert torch.equal(batched, looped)
    assert batched_calls <= 3 * len(modules) < looped_calls  # a few window lengths, not one call per window


def test_flash_attention_models_keep_their_single_call():
    config = types.SimpleNamespace(vision_config=types.SimpleNamespace(_attn_implementation="flash_attention_2"))
    model = types.SimpleNamespace(config=config, modules=lambda: pytest.fail("no module should be touched"))
    assert batch_windows(model) == 0
