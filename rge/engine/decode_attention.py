"""Attention for fixed-shape decode steps over a ``SlotCache``: one query token per row, whole-capacity keys.

Each row attends to one contiguous run of columns, ``[first, stop)``: its prompt is left-padded and
right-aligned when admitted, and every later column is its own (rows move whole when compacted). A
``DecodeWindow`` holds those bounds as device tensors, which a captured CUDA graph reads at replay:

- with flash-attention installed and the model loaded with ``flash_attention_2``, the step calls its
  KV-cache kernel, ``flash_attn_with_kvcache(cache_leftpad=first, cache_seqlens=stop)``: it reads each
  row's own columns only and handles the grouped key/value heads itself;
- otherwise scaled-dot-product attention with a boolean mask built from the same bounds (transformers'
  ``sdpa`` function, which folds the query heads onto their key/value head for one-token queries).

The step switches the language model's attention to ``static_decode_attention`` for its own forward only
(``decode_attention``): prefill and everything else keep the implementation the model was loaded with.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "rge_static_decode"


@dataclass
class DecodeWindow:
    """The columns each row of a decode step attends to: ``[first, stop)``, and the same as a 4-D mask."""

    first: torch.Tensor  # (bucket,) int32: flash-attention's cache_leftpad
    stop: torch.Tensor  # (bucket,) int32: flash-attention's cache_seqlens
    mask: torch.Tensor  # (bucket, 1, 1, capacity) bool
    flash: bool  # call flash-attention's KV-cache kernel

    @classmethod
    def from_mask(cls, mask: torch.Tensor, write_at: torch.Tensor, flash: bool) -> DecodeWindow:
        """From the cache's (bucket, capacity) 0/1 mask (the new column included) and the written column:
        tensor operations only, so a graph replays them with the step."""
        first = mask.int().argmax(dim=1)  # the first 1 of each row
        stop = (write_at + 1).expand_as(first)
        columns = torch.arange(mask.shape[1], device=mask.device)
        window = (columns >= first[:, None]) & (columns < stop[:, None])
        return cls(first.int(), stop.int(), window[:, None, None, :], flash)


@cache
def flash_kvcache_kernel() -> Callable[..., torch.Tensor] | None:
    """``flash_attn.flash_attn_with_kvcache`` when flash-attention imports and takes ``cache_leftpad``
    (2.6 and later), else None."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    if "cache_leftpad" not in inspect.signature(flash_attn_with_kvcache).parameters:
        return None
    return flash_attn_with_kvcache  # type: ignore[no-any-return]


def static_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    decode_window: DecodeWindow,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One-token queries (B, H, 1, D) against whole-capacity keys and values (B, Hk, C, D); returns the
    attention output as (B, 1, H, D), as transformers' attention functions do."""
    if decode_window.flash:
        kernel = flash_kvcache_kernel()
        assert kernel is not None
        output = kernel(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            cache_seqlens=decode_window.stop,
            cache_leftpad=decode_window.first,
            softmax_scale=scaling,
            causal=True,
        )
        return output, None
    kwargs.pop("dropout", None)
    return sdpa_attention_forward(module, query, key, value, decode_window.mask, dropout=0.0, scaling=scaling, **kwargs)


AttentionInterface.register(NAME, static_decode_attention)


def uses_flash_kernel(language_model: Any, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decode steps call flash-attention: loaded with it, on CUDA, in a half-precision dtype."""
    loaded_with = str(language_model.config._attn_implementation or "")
    return (
        loaded_with.startswith("flash_attention")
        and device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and flash_kvcache_kernel() is not None
    )


@contextmanager
def decode_attention(language_model: Any) -> Iterator[None]:
    """Route the language model's attention layers to ``static_decode_attention`` inside the block."""
    config = language_model.config
    loaded_with = config._attn_implementation_internal
    config._attn_implementation_internal = NAME
    try:
        yield
    finally:
        config._attn_implementation_internal = loaded_with
