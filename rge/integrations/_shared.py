"""What every adapter needs: an encoder, given or loaded by name."""

from __future__ import annotations

from typing import Any

from ..encoder import RGEEncoder
from ..prompts import resolve_prompt
from ..types import PromptName


def resolve_encoder(encoder: RGEEncoder | None, model_name: str | None, load_kwargs: dict[str, Any]) -> RGEEncoder:
    """``encoder`` as given, else ``RGEEncoder.from_pretrained(model_name, **load_kwargs)``; exactly one of the two."""
    if (encoder is None) == (model_name is None):
        raise ValueError("pass either encoder=RGEEncoder(...) or model_name='MCG-NJU/RGE' (a hub id or local path)")
    if encoder is not None:
        if load_kwargs:
            raise ValueError(f"loading options {sorted(load_kwargs)} only apply with model_name")
        return encoder
    return RGEEncoder.from_pretrained(model_name, **load_kwargs)  # type: ignore[arg-type]


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
