"""Checkpoint loading: both layouts, the hub path offline, a clear error without <emb>, defaults, pixel cap."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from rge import RGECheckpointError, RGEEncoder
from rge.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from rge.loading import choose_attention, choose_device, choose_dtype
from rge.testing import build_tiny_checkpoint, install_in_hf_cache, make_test_image

from .conftest import BUDGET, MAX_PIXELS, MIN_PIXELS

TEXTS = ["What is in the image?", "cat", "Find the caption of this photo."]


def _images():
    return [make_test_image(64, 48, seed=1), None, make_test_image(120, 60, seed=2)]


def _load(path, **kwargs):
    return RGEEncoder.from_pretrained(
        path, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, max_new_tokens=BUDGET, **kwargs
    )


def test_both_layouts_load_and_agree(encoder, tiny_legacy_path):
    legacy_files = {p.name for p in tiny_legacy_path.iterdir()}
    assert {"preprocessor_config.json", "chat_template.json", "model.safetensors.index.json"} <= legacy_files
    assert "processor_config.json" not in legacy_files and "chat_template.jinja" not in legacy_files
    legacy = _load(tiny_legacy_path)
    for reason in (False, True):
        a = encoder.encode(TEXTS, images=_images(), reason=reason)
        b = legacy.encode(TEXTS, images=_images(), reason=reason)
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_hub_id_loads_from_the_cache_offline(tiny_path, tmp_path, monkeypatch, encoder):
    import huggingface_hub.constants

    install_in_hf_cache(tiny_path, "MCG-NJU/RGE", tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub = _load("MCG-NJU/RGE", cache_dir=tmp_path)
    np.testing.assert_allclose(hub.encode_document(TEXTS), encoder.encode_document(TEXTS), atol=1e-6)


def test_unknown_hub_id_offline_fails_clearly(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(Exception, match="(?i)offline|cache|local"):
        RGEEncoder.from_pretrained("someone/not-cached", cache_dir=tmp_path)


def test_checkpoint_without_emb_is_refused(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "plain", with_emb_token=False)
    with pytest.raises(RGECheckpointError, match="<emb>"):
        RGEEncoder.from_pretrained(path)


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(RGECheckpointError, match="not a checkpoint directory"):
        RGEEncoder.from_pretrained(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RGECheckpointError, match="config.json"):
        RGEEncoder.from_pretrained(tmp_path / "empty")


def test_defaults_on_this_machine(encoder):
    assert encoder.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert encoder.dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert encoder.model.config._attn_implementation == choose_attention(None, encoder.device)
    assert encoder.embedding_dim == encoder.model.config.text_config.hidden_size == 64


def test_device_dtype_and_attention_choices(monkeypatch):
    cuda = torch.device("cuda")
    assert choose_device("cpu") == torch.device("cpu")
    assert choose_dtype(None, cuda) == torch.bfloat16
    assert choose_dtype(None, torch.device("cpu")) == torch.float32
    assert choose_dtype("float16", cuda) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        choose_dtype("float33", cuda)
    assert choose_attention("eager", cuda) == "eager"
    assert choose_attention(None, torch.device("cpu")) == "sdpa"
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # present but broken: import fails
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    assert choose_attention(None, cuda) == "sdpa"
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert choose_attention(None, cuda) == "flash_attention_2"
    assert choose_attention(None, torch.device("cpu")) == "sdpa"


def test_dtype_argument_is_applied(tiny_path):
    half = _load(tiny_path, dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    vector = half.encode_document("cat")
    assert vector.dtype == np.float32 and np.isclose(np.linalg.norm(vector), 1.0, atol=1e-5)


def test_default_pixel_budget_caps_a_huge_image(tiny_path):
    encoder = RGEEncoder.from_pretrained(tiny_path)
    vision = encoder.checkpoint.vision
    assert (vision.min_pixels, vision.max_pixels) == (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
    huge = make_test_image(4000, 3000, seed=9)
    pixel_values, grid = vision([huge])
    tokens = int(grid[0].prod()) // 4
    assert 256 <= tokens <= 1024
    assert tokens == vision.token_count(huge, 0)
    assert pixel_values.shape[0] == int(grid[0].prod())
    small_pixels, small_grid = vision([make_test_image(40, 30, seed=9)])
    assert int(small_grid[0].prod()) // 4 >= 256
    vector = encoder.encode_document("a huge photo", images=[huge])
    assert vector.shape == (64,) and np.isfinite(vector).all()


def test_custom_pixel_budget(tiny_path):
    encoder = RGEEncoder.from_pretrained(tiny_path, min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    _, grid = encoder.checkpoint.vision([make_test_image(4000, 3000, seed=9)])
    assert int(grid[0].prod()) // 4 <= 16
