"""Attention for fixed-shape decode steps over a ``SlotCache``: one query token per row, whole-capacity keys.

Each row attends to one contiguous run of columns, ``[first, stop)``: its prompt is left-padded and
right-aligned when admitted, and every later column is its own (rows move whole when compacted). A
``DecodeWindow`` holds those bounds as device tensors, which a captured CUDA graph reads at replay:

- sdpa or eager (the model's own attention): the window as a 4-D boolean mask (transformers' sdpa folds
  the query heads onto their key/value head for one-token queries, so the cache is not repeated);
- a model loaded with flash-attention: transformers' flash path takes a 2-D padding mask only, so
  ``install_flash_dispatch`` wraps the registered flash attention function: a call that carries a
  ``decode_window`` goes to flash-attention's KV-cache kernel,
  ``flash_attn_with_kvcache(cache_leftpad=first, cache_seqlens=stop)``, which reads each row's own
  columns only (2.6 or later, in half precision), or else to sdpa with the 4-D mask; every other call
  (prefill, other models, other threads) goes to the function it wraps, unchanged.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from .transformers_internals import attention_implementation, register_attention, registered_attention


@dataclass
class DecodeWindow:
    """The columns each row of a decode step attends to: ``[first, stop)``, and the same as a 4-D mask."""

    first: torch.Tensor  # (bucket,) int32: flash-attention's cache_leftpad
    stop: torch.Tensor  # (bucket,) int32: flash-attention's cache_seqlens
    mask: torch.Tensor  # (bucket, 1, 1, capacity) bool

    @classmethod
    def from_mask(cls, mask: torch.Tensor, write_at: torch.Tensor) -> DecodeWindow:
        """From the cache's (bucket, capacity) 0/1 mask (the new column included) and the written column:
        tensor operations only, so a graph replays them with the step."""
        first = mask.int().argmax(dim=1)  # the first 1 of each row
        stop = (write_at + 1).expand_as(first)
        columns = torch.arange(mask.shape[1], device=mask.device)
        window = (columns >= first[:, None]) & (columns < stop[:, None])
        return cls(first.int(), stop.int(), window[:, None, None, :])


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


def prepared_mask(allowed: torch.Tensor, model: Any) -> torch.Tensor:
    """A one-token step's (R, 1, 1, T) boolean mask in the form transformers hands a prepared 4-D mask to the
    model's attention as it is: additive (0 or the dtype's minimum) for eager, boolean otherwise (sdpa; the
    flash dispatch reads the ``DecodeWindow``). A prepared mask spares transformers' mask building, which
    reads the device every step."""
    if attention_implementation(model.config) != "eager":
        return allowed
    dtype = next(model.parameters()).dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def step_mask(attention_mask: torch.Tensor, model: Any) -> torch.Tensor:
    """The mask of a one-token step over ``attention_mask``'s (R, T) columns (the new one included), as the
    model's attention takes it prepared; a flash-attention model keeps the 2-D padding mask its path takes."""
    if loaded_with_flash(model):
        return attention_mask
    return prepared_mask(attention_mask.bool()[:, None, None, :], model)


def loaded_with_flash(language_model: Any) -> bool:
    """Whether the model runs a flash-attention (its decode steps then go through ``install_flash_dispatch``):
    any implementation named with "flash", hub kernels included, as transformers tells them apart."""
    return "flash" in attention_implementation(language_model.config)


def kvcache_kernel_for(query: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    """flash-attention's KV-cache kernel, where it can take this step: CUDA, half precision, 2.6 or later."""
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        return flash_kvcache_kernel()
    return None


def decode_attention(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window: DecodeWindow, scaling: Any
) -> torch.Tensor:
    """A decode step's attention in a flash-attention model: the KV-cache kernel where it takes the window
    (``kvcache_kernel_for``), else sdpa with the window as a mask (never transformers' flash wrapper, which
    takes a 2-D padding mask only)."""
    kernel = kvcache_kernel_for(query)
    if kernel is not None:
        return flash_decode(kernel, query, key, value, window, scaling)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    output, _ = sdpa_attention_forward(module, query, key, value, window.mask, scaling=scaling)
    return output  # type: ignore[no-any-return]


def flash_decode(
    kernel: Callable[..., torch.Tensor],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    window: DecodeWindow,
    scaling: float | None,
) -> torch.Tensor:
    """One-token queries (B, H, 1, D) against whole-capacity keys and values (B, Hk, C, D), each row within
    its window; returns (B, 1, H, D), as transformers' attention functions do."""
    return kernel(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        cache_seqlens=window.stop,
        cache_leftpad=window.first,
        softmax_scale=scaling,
        causal=True,
    )


def install_flash_dispatch(implementation: str) -> None:
    """Wrap the attention function registered as ``implementation``: calls with a ``decode_window`` run
    ``decode_attention``, all others the wrapped function. Idempotent."""
    wrapped = registered_attention(implementation)
    if getattr(wrapped, "rge_wrapped", None) is not None:
        return

    def dispatch(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: Any,
        decode_window: DecodeWindow | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        if decode_window is None:
            return wrapped(module, query, key, value, attention_mask, *args, **kwargs)  # type: ignore[no-any-return]
        return decode_attention(module, query, key, value, decode_window, kwargs.get("scaling")), None

    dispatch.rge_wrapped = wrapped  # type: ignore[attr-defined]
    register_attention(implementation, dispatch)
