"""What every adapter needs: an encoder, given or loaded by name."""

from __future__ import annotations

from typing import Any

from ..encoder import RGEEncoder


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
