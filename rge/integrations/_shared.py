"""What every adapter needs: an encoder, given or loaded by name, and the configuration that loads it again."""

from __future__ import annotations

import json
import os
import weakref
from typing import Any

import torch

from ..encoder import RGEEncoder
from ..prompts import resolve_prompt
from ..types import PromptName


def _check_source(encoder: RGEEncoder | None, model_name: str | None, load_kwargs: dict[str, Any]) -> None:
    if (encoder is None) == (model_name is None):
        raise ValueError("pass either encoder=RGEEncoder(...) or model_name='MCG-NJU/RGE' (a hub id or local path)")
    if encoder is not None and load_kwargs:
        raise ValueError(f"loading options {sorted(load_kwargs)} only apply with model_name")


def resolve_encoder(encoder: RGEEncoder | None, model_name: str | None, load_kwargs: dict[str, Any]) -> RGEEncoder:
    """``encoder`` as given, else ``RGEEncoder.from_pretrained(model_name, **load_kwargs)``; exactly one of the two."""
    _check_source(encoder, model_name, load_kwargs)
    if encoder is not None:
        return encoder
    return RGEEncoder.from_pretrained(model_name, **load_kwargs)  # type: ignore[arg-type]


VECTOR_SETTINGS = ("model_name", "revision", "max_new_tokens", "min_pixels", "max_pixels", "max_length", "dtype",
                   "repetition_penalty")  # fmt: skip
"""What a saved configuration holds that changes the vectors (the other loading options do not)."""


def saved_config(encoder: RGEEncoder | None, model_name: str | None, load_kwargs: dict[str, Any]) -> dict[str, Any]:
    """JSON values that load the same model again: ``{"model_name": ..., **from_pretrained options}``.

    With ``model_name``: the options as given (dtypes, devices and paths as strings; a ``token`` string is a
    credential and never saved, the environment's Hugging Face login serves instead). With ``encoder``: its
    checkpoint (hub id and revision, or local directory) and every setting that changes a vector.
    """
    _check_source(encoder, model_name, load_kwargs)
    if encoder is None:
        options = {key: _json_value(key, value) for key, value in load_kwargs.items()}
        saved = {key: value for key, value in options.items() if not (key == "token" and isinstance(value, str))}
        return {"model_name": model_name, **saved}
    checkpoint = encoder.checkpoint
    settings = (checkpoint.name or str(checkpoint.path), checkpoint.revision, encoder.max_new_tokens,
                checkpoint.vision.min_pixels, checkpoint.vision.max_pixels, encoder.max_length,
                _json_value("dtype", encoder.dtype), encoder.generation_settings.repetition_penalty)  # fmt: skip
    return {key: value for key, value in zip(VECTOR_SETTINGS, settings) if value is not None}


def _json_value(key: str, value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (torch.device, os.PathLike)):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"loading option {key}={value!r} cannot be saved: give a str, number or bool")


_given: weakref.WeakValueDictionary[str, RGEEncoder] = weakref.WeakValueDictionary()
_loaded: dict[str, RGEEncoder] = {}


def shared_encoder(encoder: RGEEncoder | None, model_name: str | None, load_kwargs: dict[str, Any]) -> RGEEncoder:
    """As ``resolve_encoder``, but one model per ``saved_config``: an adapter rebuilt from its saved configuration
    reuses the encoder it was made from (while that one lives) or the one loaded before (kept for the process).

    Chroma and LanceDB rebuild their embedding function each time a stored collection or table is used.
    """
    key = json.dumps(saved_config(encoder, model_name, load_kwargs), sort_keys=True)
    if encoder is not None:
        _given[key] = encoder
        return encoder
    found = _given.get(key) or _loaded.get(key)
    if found is None:
        found = _loaded[key] = RGEEncoder.from_pretrained(model_name, **load_kwargs)  # type: ignore[arg-type]
    return found


def model_label(encoder: RGEEncoder, model_name: str | None) -> str:
    return model_name if model_name is not None else str(encoder.checkpoint.path)


def side_prompts(
    prompt_name: PromptName | None, query_prompt: str | None, document_prompt: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``encode`` keyword arguments for the query side and the document side of an adapter.

    ``prompt_name`` names a task of ``rge.prompts.TASK_PROMPTS`` (each side gets its own instruction);
    ``query_prompt`` / ``document_prompt`` are literal prefixes. Checked here, when the adapter is built.
    """
    if prompt_name is not None and (query_prompt is not None or document_prompt is not None):
        raise ValueError("give prompt_name or query_prompt/document_prompt, not both")
    if prompt_name is not None:
        for reason in (True, False):
            resolve_prompt(None, prompt_name, reason)
        return {"prompt_name": prompt_name}, {"prompt_name": prompt_name}
    query: dict[str, Any] = {} if query_prompt is None else {"prompt": query_prompt}
    document: dict[str, Any] = {} if document_prompt is None else {"prompt": document_prompt}
    return query, document
