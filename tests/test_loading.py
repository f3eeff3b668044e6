"""Checkpoint loading: the 4.51.3 layout exactly and strictly, the 5.x layout, the hub path offline, a clear
error without <emb>, defaults, pixel cap."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rge import RGECheckpointError, RGEEncoder, RGEModelNotFoundError
from rge.loading import choose_attention, choose_device, choose_dtype, read_generation_settings
from rge.testing import EMB, build_tiny_checkpoint, install_in_hf_cache, make_test_image
from rge.vision import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

from .conftest import BUDGET, MAX_PIXELS, MIN_PIXELS

TEXTS = ["What is in the image?", "cat", "Find the caption of this photo."]


def _images():
    return [make_test_image(64, 48, seed=1), None, make_test_image(120, 60, seed=2)]


def _load(path, **kwargs):
    return RGEEncoder.from_pretrained(
        path, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, max_new_tokens=BUDGET, **kwargs
    )


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _stored_weights(path: Path) -> dict[str, torch.Tensor]:
    index = _read_json(path / "model.safetensors.index.json")["weight_map"]
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index.values())):
        weights.update(load_file(path / shard))
    return weights


def test_test_checkpoint_has_the_published_layout(tiny_path, encoder):
    """What the 4.51.3-saved MCG-NJU/RGE has, and a kind test checkpoint would lack."""
    files = {p.name for p in tiny_path.iterdir()}
    assert {"preprocessor_config.json", "chat_template.json", "generation_config.json"} <= files
    assert "processor_config.json" not in files and "chat_template.jinja" not in files
    config = _read_json(tiny_path / "config.json")
    assert "text_config" not in config and config["hidden_size"] == 64 and config["torch_dtype"] == "float32"
    assert config["transformers_version"] == "4.51.3" and config["tie_word_embeddings"] is True
    assert config["rope_scaling"]["type"] == config["rope_scaling"]["rope_type"] == "default"
    assert "mrope_section" in config["rope_scaling"]
    stored = _stored_weights(tiny_path)
    assert len(set(_read_json(tiny_path / "model.safetensors.index.json")["weight_map"].values())) >= 2
    assert "lm_head.weight" not in stored
    assert any(k.startswith("model.layers.") for k in stored) and any(k.startswith("visual.") for k in stored)
    tokenizer = encoder.checkpoint.tokenizer
    assert config["vocab_size"] > len(tokenizer) > encoder.checkpoint.emb_token_id
    assert encoder.checkpoint.emb_token_id == tokenizer.convert_tokens_to_ids(EMB)
    assert (
        not torch.all(stored["model.norm.weight"] == 1)
        and stored["model.layers.0.self_attn.q_proj.bias"].abs().min() > 0
    )
    generation = _read_json(tiny_path / "generation_config.json")
    assert (generation["do_sample"], generation["top_k"], generation["repetition_penalty"]) == (True, 1, 1.05)


def test_published_layout_loads_every_weight_exactly(tiny_path, encoder):
    """Nothing re-initialised: every stored tensor is in the model, and the tied head is the embedding."""
    params = dict(encoder.model.named_parameters())
    stored = _stored_weights(tiny_path)
    for name, tensor in stored.items():
        new = name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else "model." + name
        assert torch.equal(params[new], tensor), name
    assert encoder.model.lm_head.weight.data_ptr() == params["model.language_model.embed_tokens.weight"].data_ptr()
    assert len(stored) == len(params)  # lm_head is the embedding, not a parameter of its own


def test_both_layouts_load_and_agree(encoder, tiny5_path):
    assert "text_config" in _read_json(tiny5_path / "config.json")
    modern = _load(tiny5_path)
    assert modern.generation_settings.repetition_penalty == encoder.generation_settings.repetition_penalty == 1.05
    for reason in (False, True):
        a = encoder.encode(TEXTS, images=_images(), reason=reason)
        b = modern.encode(TEXTS, images=_images(), reason=reason)
        np.testing.assert_allclose(a, b, atol=1e-5)


def _edited_copy(source: Path, target: Path, edit) -> Path:
    """A copy of ``source`` whose first shard went through ``edit`` (index kept consistent)."""
    shutil.copytree(source, target)
    index_path = target / "model.safetensors.index.json"
    index = _read_json(index_path)
    shard = target / sorted(set(index["weight_map"].values()))[0]
    weights = load_file(shard)
    edit(weights)
    save_file(weights, shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update(dict.fromkeys(weights, shard.name))
    index_path.write_text(json.dumps(index), encoding="utf-8")
    return target


@pytest.mark.parametrize(
    ("kind", "edit", "named"),
    [
        ("missing", lambda w: w.pop("model.layers.0.mlp.down_proj.weight"), "layers.0.mlp.down_proj.weight"),
        ("unexpected", lambda w: w.update({"model.layers.0.extra.weight": torch.zeros(3)}), "layers.0.extra.weight"),
        ("mismatched", lambda w: w.update({"model.norm.weight": torch.ones(3)}), "norm.weight (checkpoint [3]"),
    ],
)
def test_checkpoint_that_does_not_load_exactly_is_refused(tiny_path, tmp_path, kind, edit, named):
    broken = _edited_copy(tiny_path, tmp_path / kind, edit)
    with pytest.raises(RGECheckpointError, match=rf"{kind} weights: .*{re.escape(named)}"):
        RGEEncoder.from_pretrained(broken, device="cpu")


def test_hub_id_loads_from_the_cache_offline(tiny_path, tmp_path, monkeypatch, encoder):
    import huggingface_hub.constants

    install_in_hf_cache(tiny_path, "MCG-NJU/RGE", tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub = _load("MCG-NJU/RGE", cache_dir=tmp_path)
    np.testing.assert_allclose(hub.encode_document(TEXTS), encoder.encode_document(TEXTS), atol=1e-6)
    assert repr(hub).startswith("RGEEncoder(model='MCG-NJU/RGE', device=")


def test_unknown_hub_id_offline_fails_clearly(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RGEModelNotFoundError) as raised:
        RGEEncoder.from_pretrained("someone/not-cached", cache_dir=tmp_path)
    assert str(raised.value).startswith(
        f"model 'someone/not-cached' is not a local folder (no such directory: {tmp_path / 'someone/not-cached'}) "
        "and cannot be downloaded from the hub: HF_HUB_OFFLINE is set and there is no cached copy."
    )
    assert isinstance(raised.value.__cause__, LocalEntryNotFoundError)  # the hub's own error, chained
    with pytest.raises(RGEModelNotFoundError):  # not the default settings, as if the file did not exist
        read_generation_settings("someone/not-cached", cache_dir=tmp_path)


def test_a_misspelt_model_says_it_is_neither_a_folder_nor_on_the_hub(tmp_path, monkeypatch):
    """A real process, offline with an empty cache: one RGEModelNotFoundError, with both reasons."""
    code = (
        "from rge import RGEEncoder, RGEError\n"
        "try:\n    RGEEncoder.from_pretrained('tyni')\n"
        "except RGEError as error:\n    print(type(error).__name__, error)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120, check=True)  # fmt: skip
    assert done.stdout.startswith(
        f"RGEModelNotFoundError model 'tyni' is not a local folder (no such directory: {tmp_path / 'tyni'}) and "
        "cannot be downloaded from the hub: HF_HUB_OFFLINE is set and there is no cached copy"
    ), done.stdout + done.stderr


def _hub_error(kind: str) -> Exception:
    import httpx
    from huggingface_hub import errors

    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/api/models/x/y"))
    made = {
        "gated": lambda: errors.GatedRepoError("403", response=response),
        "missing": lambda: errors.RepositoryNotFoundError("404", response=response),
        "revision": lambda: errors.RevisionNotFoundError("404", response=response),
        "unreachable": lambda: errors.LocalEntryNotFoundError("cannot reach the hub"),
    }
    return made[kind]()


@pytest.mark.parametrize(
    "kind, said",
    [("gated", "the repository is gated: request access on its hub page, then set HF_TOKEN"),
     ("missing", "there is no hub repository of that name that you can read (a private one needs HF_TOKEN)"),
     ("revision", "the repository has no revision 'v9'"),
     ("unreachable", "the hub cannot be reached and there is no cached copy")],
)  # fmt: skip
def test_each_hub_failure_is_explained(monkeypatch, tmp_path, kind, said):
    import huggingface_hub

    def failing(*args, **kwargs):
        raise _hub_error(kind)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(RGEModelNotFoundError, match=re.escape(said)) as raised:
        RGEEncoder.from_pretrained("x/y", revision="v9", cache_dir=tmp_path)
    assert "'x/y' is not a local folder" in str(raised.value)
    assert type(raised.value.__cause__).__name__ == type(_hub_error(kind)).__name__


@pytest.mark.parametrize(("name", "size"), [("MCG-NJU/RGE", "download it (about 7 GB), or"),
                                            ("someone/other", "download it, or")])  # fmt: skip
def test_the_download_size_is_said_for_the_published_model_only(monkeypatch, tmp_path, name, size):
    import huggingface_hub

    def failing(*args, **kwargs):
        raise _hub_error("unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(RGEModelNotFoundError) as raised:
        RGEEncoder.from_pretrained(name, cache_dir=tmp_path)
    assert size in str(raised.value) and str(raised.value).count("GB") == size.count("GB")


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


def test_defaults_on_this_machine(tiny_path):
    """Nothing given: the device, dtype and attention are chosen from the machine: CUDA in bf16 (with
    flash-attention 2 when it imports) where there is CUDA, else the CPU in fp32 with sdpa."""
    encoder = RGEEncoder.from_pretrained(tiny_path)
    cuda = torch.cuda.is_available()
    assert encoder.device == (torch.device("cuda") if cuda else torch.device("cpu"))
    assert encoder.dtype == (torch.bfloat16 if cuda else torch.float32)
    assert encoder.model.dtype == encoder.dtype and encoder.model.device.type == encoder.device.type
    assert encoder.model.config._attn_implementation == ("flash_attention_2" if cuda and _imports("flash_attn")
                                                         else "sdpa")  # fmt: skip
    assert encoder.embedding_dim == encoder.model.config.text_config.hidden_size == 64


def _imports(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_device_dtype_and_attention_choices(monkeypatch):
    cuda = torch.device("cuda")
    assert choose_device("cpu") == torch.device("cpu")
    assert choose_dtype(None, cuda) == torch.bfloat16
    assert choose_dtype(None, torch.device("cpu")) == torch.float32
    assert choose_dtype("float16", cuda) == torch.float16
    with pytest.raises(ValueError, match="not a torch dtype"):
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
    prepared = vision.prepare(huge, 0)
    tokens = prepared.grid[1] * prepared.grid[2] // 4
    assert 256 <= tokens == prepared.tokens <= 1024
    assert prepared.take_pixel_values().shape[0] == prepared.grid[1] * prepared.grid[2]
    assert vision.prepare(make_test_image(40, 30, seed=9), 0).tokens >= 256
    vector = encoder.encode_document("a huge photo", images=[huge])
    assert vector.shape == (64,) and np.isfinite(vector).all()


def test_custom_pixel_budget(tiny_path):
    encoder = RGEEncoder.from_pretrained(tiny_path, min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    assert encoder.checkpoint.vision.prepare(make_test_image(4000, 3000, seed=9), 0).tokens <= 16


def test_loading_is_quiet_unless_a_progress_bar_is_asked_for(tiny_path, capfd):
    """No "Loading weights" bar by default; with ``show_progress_bar=True`` there is one; either way transformers'
    own bars show as before once loading is done."""
    from transformers.utils import logging

    capfd.readouterr()
    _load(tiny_path, device="cpu")
    assert capfd.readouterr().err == ""
    _load(tiny_path, device="cpu", show_progress_bar=True)
    assert "Loading weights" in capfd.readouterr().err
    for _ in logging.tqdm(range(3), desc="after loading"):
        pass
    assert "after loading" in capfd.readouterr().err
