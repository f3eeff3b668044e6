"""Checkpoint -> model, tokenizer, image processor and prompt template; device, dtype and attention.

Reads both file layouts an RGE checkpoint can have: the one saved by transformers 4.5x
(``preprocessor_config.json``, ``chat_template.json``, sharded safetensors with an index) and the 5.x
one (``processor_config.json``, ``chat_template.jinja``). ``AutoProcessor`` is not used: for Qwen2.5-VL it
needs torchvision, which an image-and-text embedder does not.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .engine.decoding_settings import GENERATION_CONFIG_FILE, GenerationSettings
from .errors import RGECheckpointError, RGEInputError, RGEModelNotFoundError, require_extra
from .prompts import EMB_TOKEN, IMAGE_PAD_TOKEN, PromptTemplate
from .vision import VisionPreprocessor, pixel_budget

CHECKPOINT_FILE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
"""What a hub download fetches: configs, weights, tokenizer files, the chat template."""

DOWNLOAD_SIZES = {"MCG-NJU/RGE": "about 7 GB"}
"""What a first download of a known model weighs, said when it cannot be downloaded now."""


@dataclass
class LoadedCheckpoint:
    """Everything the encoder needs from a checkpoint (its repr leaves out the model and its processors)."""

    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    vision: VisionPreprocessor = field(repr=False)
    template: PromptTemplate = field(repr=False)
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
    """A local directory as it is; otherwise a hub snapshot (honours ``HF_HUB_OFFLINE`` and the cache).

    ``RGEModelNotFoundError`` when it is neither, saying why for both (see ``hub_failure``).
    """
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise RGECheckpointError(f"{str(name_or_path)!r} is not a checkpoint directory (it is a file)")
    if str(name_or_path).startswith((".", "/", "~")):
        raise RGEModelNotFoundError(
            f"{str(name_or_path)!r} is not a checkpoint directory (no such directory: {local.absolute()})"
        )
    from huggingface_hub import snapshot_download

    with explained_hub_failures(name_or_path, revision=revision, local_files_only=local_files_only):
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


@contextlib.contextmanager
def explained_hub_failures(
    name: str | os.PathLike[str], *, revision: str | None = None, local_files_only: bool = False
) -> Iterator[None]:
    """Around a hub download of ``name``: a failure ``hub_failure`` explains becomes one
    ``RGEModelNotFoundError`` that says both why ``name`` is not local and why the hub did not give it,
    the hub's error chained."""
    try:
        yield
    except Exception as error:
        reason = hub_failure(error, name=name, revision=revision, local_files_only=local_files_only)
        if reason is None:
            raise
        where = Path(name).expanduser().absolute()
        raise RGEModelNotFoundError(
            f"model {str(name)!r} is not a local folder (no such directory: {where}) and cannot be downloaded "
            f"from the hub: {reason}"
        ) from error


def hub_failure(
    error: BaseException,
    *,
    name: str | os.PathLike[str] = "",
    revision: str | None = None,
    local_files_only: bool = False,
) -> str | None:
    """Why the hub did not give model ``name``, in words a user can act on; None when ``error`` is no such
    failure."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, GatedRepoError):
        return "the repository is gated: request access on its hub page, then set HF_TOKEN"
    if isinstance(error, RepositoryNotFoundError):
        return "there is no hub repository of that name that you can read (a private one needs HF_TOKEN)"
    if isinstance(error, RevisionNotFoundError):
        return f"the repository has no revision {revision!r}"
    if isinstance(error, HFValidationError):
        return f"it is not a hub id either ({error})"
    if isinstance(error, LocalEntryNotFoundError) or _is_connection_error(error):
        cause = (
            "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
            else "local_files_only=True" if local_files_only
            else "the hub cannot be reached"
        )  # fmt: skip
        size = DOWNLOAD_SIZES.get(str(name))
        return (
            f"{cause} and there is no cached copy. Connect once to download it{f' ({size})' if size else ''}, "
            "or pass a local checkpoint directory"
        )
    return None


def _is_connection_error(error: BaseException) -> bool:
    names = {type(e).__name__ for e in (error, error.__cause__, error.__context__) if e is not None}
    return bool(names & {"ConnectError", "ConnectionError", "ConnectTimeout", "OfflineModeIsEnabled"})


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
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    with explained_hub_failures(name_or_path, revision=revision, local_files_only=local_files_only):
        try:
            file = hf_hub_download(
                str(name_or_path), GENERATION_CONFIG_FILE, revision=revision,
                cache_dir=None if cache_dir is None else str(cache_dir), token=token,
                local_files_only=local_files_only,
            )  # fmt: skip
        except EntryNotFoundError as error:
            if isinstance(error, LocalEntryNotFoundError):  # (a subclass): not cached and not reachable
                raise
            return GenerationSettings().with_penalty(repetition_penalty)  # the repository has no such file
    return GenerationSettings.from_checkpoint(Path(file).parent).with_penalty(repetition_penalty)


def choose_device(device: str | torch.device | None) -> torch.device:
    """The given device, else CUDA when available, else CPU; RGEInputError for a device this machine lacks."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise RGEInputError(f"device {device!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        build = "" if torch.version.cuda else f" (torch {torch.__version__} is built without CUDA)"
        raise RGEInputError(f"device {str(device)!r}: CUDA is not available on this machine{build}; use 'cpu'")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise RGEInputError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise RGEInputError(f"device {str(device)!r}: MPS is not available on this machine; use 'cpu'")
    return parsed


def choose_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The given floating-point dtype, else bf16 on CUDA and fp32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise RGEInputError(f"dtype {dtype!r} is not a torch dtype; use 'float32', 'bfloat16' or 'float16'")
    if not resolved.is_floating_point:
        raise RGEInputError(f"dtype {dtype!r} is not a floating-point type; use 'float32', 'bfloat16' or 'float16'")
    return resolved


def choose_attention(attn_implementation: str | None, device: torch.device) -> str:
    """The given implementation, else flash-attention 2 when it imports and the device is CUDA, else sdpa."""
    if attn_implementation == "flash_attention_2":
        require_extra("flash_attn", extra="gpu", needed_by='attn_implementation="flash_attention_2"')
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


def load_tokenizer(path: Path) -> Any:
    """The tokenizer of a resolved checkpoint directory (RGECheckpointError when it has no config.json)."""
    from transformers import AutoTokenizer

    if not (path / "config.json").is_file():
        raise RGECheckpointError(f"no config.json in {path}")
    return AutoTokenizer.from_pretrained(str(path))


def load_checkpoint(
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    tokenizer: Any = None,
    show_progress_bar: bool = False,
) -> LoadedCheckpoint:
    """Load a resolved checkpoint directory onto ``device`` in ``dtype``, ready for inference.

    ``tokenizer`` replaces the checkpoint's own (training gives a base model's with ``<emb>`` added);
    transformers' "Loading weights" bar shows only with ``show_progress_bar``.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    if not (path / "config.json").is_file():
        raise RGECheckpointError(f"no config.json in {path}")
    tokenizer = load_tokenizer(path) if tokenizer is None else tokenizer
    emb_token_id = token_id(tokenizer, EMB_TOKEN, path)
    image_pad_id = token_id(tokenizer, IMAGE_PAD_TOKEN, path)
    template = PromptTemplate.from_chat_template(tokenizer, load_chat_template(path, tokenizer))
    vision = VisionPreprocessor(load_image_processor(path), *pixel_budget(min_pixels, max_pixels))
    with transformers_progress_bars(show_progress_bar):
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


@contextlib.contextmanager
def transformers_progress_bars(show: bool) -> Iterator[None]:
    """Within the block, transformers' own progress bars (its "Loading weights" bar) show only if ``show``;
    after it, they show as before. The hub's download bars are not transformers' and are left alone.

    transformers' switch (``disable_progress_bar``) is global and turns the hub's bars off too; its tqdm hook
    replaces the bar for as long as it is set, and the hook set before is put back.
    """
    if show:
        yield
        return
    from transformers.utils import logging

    def hidden(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return logging.EmptyTqdm(*args, **kwargs)

    before = logging.set_tqdm_hook(hidden)
    try:
        yield
    finally:
        logging.set_tqdm_hook(before)


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
