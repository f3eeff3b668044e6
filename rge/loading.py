"""Checkpoint -> model, tokenizer, image processor and prompt template; device, dtype and attention.

Reads both file layouts an RGE checkpoint can have: the one saved by transformers 4.5x
(``preprocessor_config.json``, ``chat_template.json``, sharded safetensors with an index) and the 5.x
one (``processor_config.json``, ``chat_template.jinja``). ``AutoProcessor`` is not used: for Qwen2.5-VL it
needs torchvision, which an image-and-text embedder does not.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .engine.generation import GENERATION_CONFIG_FILE, GenerationSettings
from .errors import RGECheckpointError
from .images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, VisionPreprocessor
from .prompts import EMB_TOKEN, IMAGE_PAD_TOKEN, PromptTemplate

CHECKPOINT_FILE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
"""What a hub download fetches: configs, weights, tokenizer files, the chat template."""


@dataclass
class LoadedCheckpoint:
    """Everything the encoder needs from a checkpoint."""

    model: Any
    tokenizer: Any
    vision: VisionPreprocessor
    template: PromptTemplate
    emb_token_id: int
    image_pad_id: int
    pad_token_id: int
    path: Path
    generation: GenerationSettings
    name: str = ""
    """What it was loaded from: the hub id, or the local directory's absolute path."""
    revision: str | None = None
    """The hub commit it was loaded at (None for a local directory)."""


def resolve_checkpoint(
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local directory as it is; otherwise a hub snapshot (honours ``HF_HUB_OFFLINE`` and the cache)."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local
    if local.exists() or str(name_or_path).startswith((".", "/", "~")):
        raise RGECheckpointError(f"{str(name_or_path)!r} is not a checkpoint directory")
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            str(name_or_path),
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            token=token,
            local_files_only=local_files_only,
            allow_patterns=CHECKPOINT_FILE_PATTERNS,
        )
    )


def read_generation_settings(
    name_or_path: str | os.PathLike[str],
    *,
    repetition_penalty: float | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> GenerationSettings:
    """The decoding settings a checkpoint's queries will use, without loading it (a hub id fetches only
    ``generation_config.json``): for recording a job's settings where the model loads elsewhere."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return GenerationSettings.from_checkpoint(local).with_penalty(repetition_penalty)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        file = hf_hub_download(
            str(name_or_path), GENERATION_CONFIG_FILE, revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir), token=token, local_files_only=local_files_only,
        )  # fmt: skip
    except EntryNotFoundError:
        return GenerationSettings().with_penalty(repetition_penalty)
    return GenerationSettings.from_checkpoint(Path(file).parent).with_penalty(repetition_penalty)


def choose_device(device: str | torch.device | None) -> torch.device:
    """The given device, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def choose_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The given dtype, else bf16 on CUDA and fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'float16'")
    return resolved


def choose_attention(attn_implementation: str | None, device: torch.device) -> str:
    """The given implementation, else flash-attention 2 when it imports and the device is CUDA, else sdpa."""
    if attn_implementation is not None:
        return attn_implementation
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "sdpa"
        return "flash_attention_2"
    return "sdpa"


def load_chat_template(path: Path, tokenizer: Any) -> str:
    """The chat template from ``chat_template.jinja`` (5.x), ``chat_template.json`` (4.5x) or the tokenizer."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    legacy = path / "chat_template.json"
    if legacy.is_file():
        return str(json.loads(legacy.read_text(encoding="utf-8"))["chat_template"])
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        return str(tokenizer.chat_template)
    raise RGECheckpointError(f"no chat template in {path} (looked for chat_template.jinja and chat_template.json)")


def load_image_processor(path: Path) -> Any:
    """The PIL Qwen2-VL image processor, read from ``processor_config.json`` or ``preprocessor_config.json``."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if not ((path / "preprocessor_config.json").is_file() or (path / "processor_config.json").is_file()):
        raise RGECheckpointError(f"no image processor config in {path}")
    return Qwen2VLImageProcessorPil.from_pretrained(str(path))


def token_id(tokenizer: Any, token: str, path: Path) -> int:
    """The id of a special token, or a clear error when the tokenizer lacks it."""
    token_ids = tokenizer.convert_tokens_to_ids([token])
    found = token_ids[0] if token_ids else None
    if found is None or found == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(found) != token:
        what = "it is not an RGE checkpoint" if token == EMB_TOKEN else "it is not a Qwen2.5-VL checkpoint"
        raise RGECheckpointError(f"the tokenizer in {path} has no {token} token: {what}")
    return int(found)


def load_checkpoint(
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> LoadedCheckpoint:
    """Load a resolved checkpoint directory onto ``device`` in ``dtype``, ready for inference."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    if not (path / "config.json").is_file():
        raise RGECheckpointError(f"no config.json in {path}")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    emb_token_id = token_id(tokenizer, EMB_TOKEN, path)
    image_pad_id = token_id(tokenizer, IMAGE_PAD_TOKEN, path)
    template = PromptTemplate.from_chat_template(tokenizer, load_chat_template(path, tokenizer))
    vision = VisionPreprocessor(
        load_image_processor(path),
        min_pixels=DEFAULT_MIN_PIXELS if min_pixels is None else min_pixels,
        max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
    )
    loaded: Any = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(path),
        dtype=dtype,
        attn_implementation=attn_implementation,
        output_loading_info=True,
        ignore_mismatched_sizes=True,  # reported in the loading info, then refused below with the others
    )
    model, loading_info = loaded
    check_loading_info(loading_info, path)
    model.to(device).eval().requires_grad_(False)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return LoadedCheckpoint(
        model=model,
        tokenizer=tokenizer,
        vision=vision,
        template=template,
        emb_token_id=emb_token_id,
        image_pad_id=image_pad_id,
        pad_token_id=int(pad_token_id or 0),
        path=path,
        generation=GenerationSettings.from_checkpoint(path),
    )


def check_loading_info(info: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose weights did not all load: a missing weight would be left at its random
    initial value, an unexpected one ignored, a mismatched one not read."""
    problems = {
        kind: sorted(_describe(key) for key in info.get(f"{kind}_keys", ()))
        for kind in ("missing", "unexpected", "mismatched")
    }
    problems = {kind: keys for kind, keys in problems.items() if keys}
    errors = [str(message) for message in info.get("error_msgs", ())]
    if problems or errors:
        listed = "; ".join(f"{kind} weights: {', '.join(_shorten(keys))}" for kind, keys in problems.items())
        raise RGECheckpointError(
            f"the weights in {path} do not match the model ({'; '.join(filter(None, [listed, *errors]))}); "
            "rge refuses a checkpoint that does not load exactly (names as transformers 5.x spells them)"
        )


def _describe(key: Any) -> str:
    """A weight name; a mismatched one (name, checkpoint shape, model shape) with both shapes."""
    if isinstance(key, tuple) and len(key) == 3:
        name, stored, expected = key
        return f"{name} (checkpoint {list(stored)}, model {list(expected)})"
    return str(key)


def _shorten(keys: list[str], limit: int = 8) -> list[str]:
    return keys if len(keys) <= limit else [*keys[:limit], f"... ({len(keys) - limit} more)"]
