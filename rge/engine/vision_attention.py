"""The vision tower's windowed attention in few calls, for attention implementations other than flash.

Qwen2.5-VL's vision blocks attend within windows (and, in a few blocks, within each image). With
flash-attention transformers makes one variable-length call per layer; with sdpa or eager it loops over
the windows in Python, one call each: 564 calls for a 280-token image, 1,768 for a 972-token one, where
every call costs a kernel launch or more. ``batch_windows`` replaces that loop in the model's own vision
attention modules: windows of equal length (nearly all of them) are stacked into one call, so a layer
makes one call per distinct window length. Each window still attends to itself only, with the same
kernel, so the outputs are the same (``tests/test_vision_attention.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

from .transformers_internals import attention_function, attention_implementation


def batch_windows(model: Any) -> int:
    """Make every vision attention module of ``model`` a ``WindowBatchedVisionAttention`` (unless it runs
    flash-attention, which needs no loop); returns how many modules are."""
    if "flash" in attention_implementation(model.config.vision_config):
        return 0
    modules = [module for module in model.modules() if isinstance(module, qwen.Qwen2_5_VLVisionAttention)]
    for module in modules:
        module.__class__ = WindowBatchedVisionAttention
    return len(modules)


class WindowBatchedVisionAttention(qwen.Qwen2_5_VLVisionAttention):
    """Qwen2.5-VL's vision attention stacking equal windows; a class rather than a patched ``forward`` so that
    the model pickles (sentence-transformers' worker processes receive it pickled)."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        max_seqlen: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``Qwen2_5_VLVisionAttention.forward`` (transformers 5.x) with its per-window loop replaced."""
        length = hidden_states.shape[0]
        query, key, value = self.qkv(hidden_states).reshape(length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings  # type: ignore[misc]
        query, key = qwen.apply_rotary_pos_emb_vision(query, key, cos, sin)
        attention = attention_function(self.config, qwen.eager_attention_forward)
        starts, lengths = cu_seqlens[:-1].tolist(), (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        output = query.new_empty((length, self.num_heads, query.shape[-1]))
        for window in sorted(set(lengths)):
            first = torch.tensor([start for start, size in zip(starts, lengths) if size == window], device=query.device)
            rows = (first[:, None] + torch.arange(window, device=query.device)).flatten()
            stacked = [
                t[rows].view(-1, window, self.num_heads, t.shape[-1]).transpose(1, 2) for t in (query, key, value)
            ]
            out, _ = attention(self, *stacked, attention_mask=None, scaling=self.scaling,
                               dropout=0.0 if not self.training else self.attention_dropout, is_causal=False,
                               **kwargs)  # fmt: skip
            output[rows] = out.reshape(-1, self.num_heads, out.shape[-1])
        return self.proj(output.reshape(length, -1).contiguous())  # type: ignore[no-any-return]
