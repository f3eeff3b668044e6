"""Tiny RGE-shaped checkpoints, built offline in seconds, to test code and pipelines without a download.

A tiny checkpoint looks like the published ``MCG-NJU/RGE`` wherever a bug could hide: the real class
(``Qwen2_5_VLForConditionalGeneration``), special tokens and chat template, the same image processor; by
default the files transformers 4.51.3 wrote (flat ``config.json``, old key names, sharded safetensors with
an index); tied input/output embeddings over a vocabulary padded past the tokenizer (``<emb>`` is not the
last row); RMSNorm weights and biases that are not trivial; and the base model's
``generation_config.json`` (sampling with ``top_k: 1`` and a 1.05 repetition penalty). Random models
almost never emit ``<emb>``, so ``<emb>``'s output row is made to win wherever one chosen ordinary token
would: rationales then end at different steps for different inputs, some never before the budget.

``with_emb_token=False`` builds the base model instead, as Qwen2.5-VL-Instruct is published: the same
files and padded vocabulary without ``<emb>`` (what ``rge train`` starts from when it adds ``<emb>``).

>>> from rge.testing import build_tiny_checkpoint
>>> path = build_tiny_checkpoint("/tmp/tiny-rge")          # doctest: +SKIP
>>> encoder = RGEEncoder.from_pretrained(path)              # doctest: +SKIP
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from ..storage import follow_umask
from .layouts import save_transformers4, save_transformers5
from .tokenizer import EMB, QWEN25_VL_CHAT_TEMPLATE, SPECIAL_TOKENS, build_tiny_tokenizer, special_token_ids
from .weights import install_emb_trigger, randomize_weights

__all__ = [
    "BASE_MODEL_DECODING",
    "EMB",
    "QWEN25_VL_CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "build_tiny_checkpoint",
    "build_tiny_tokenizer",
    "image_bytes",
    "install_in_hf_cache",
    "make_test_image",
]

Layout = Literal["transformers4", "transformers5"]

BASE_MODEL_DECODING: dict[str, Any] = {
    "do_sample": True,
    "top_k": 1,
    "top_p": 0.001,
    "temperature": 0.1,
    "repetition_penalty": 1.05,
}
"""The decoding settings of Qwen2.5-VL-3B-Instruct's ``generation_config.json``, which RGE carries."""

VOCAB_MULTIPLE = 64
"""The vocabulary is padded to a multiple of this, past the tokenizer, as Qwen's 151,936 rows are."""


def build_tiny_checkpoint(
    path: str | os.PathLike[str],
    *,
    layout: Layout = "transformers4",
    seed: int = 0,
    num_hidden_layers: int = 2,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    vision_depth: int = 2,
    with_emb_token: bool = True,
    tie_word_embeddings: bool = True,
    emb_budget: int = 32,
    decoding: dict[str, Any] | None = BASE_MODEL_DECODING,
) -> Path:
    """Write a tiny RGE-shaped checkpoint to ``path`` and return it.

    ``layout`` picks the files: ``"transformers4"`` (the published checkpoint's: ``preprocessor_config.json``,
    ``chat_template.json``, a flat ``config.json``, 4.5x weight names, sharded safetensors with an index)
    or ``"transformers5"`` (``save_pretrained`` of 5.x, ``processor_config.json``, ``chat_template.jinja``).
    ``decoding`` goes into ``generation_config.json`` with the token ids (``None``: no such file).
    ``emb_budget`` is the decoding budget the ``<emb>`` trigger is tuned for. ``with_emb_token=False``
    builds a plain Qwen2.5-VL-Instruct checkpoint (no ``<emb>``), which the encoder refuses and ``rge train``
    starts from. ``tie_word_embeddings=False`` stores a separate output head, as the 7B model does.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if layout not in ("transformers4", "transformers5"):
        raise ValueError(f"unknown layout {layout!r}; use 'transformers4' or 'transformers5'")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(with_emb_token=with_emb_token)
    ids = special_token_ids(tokenizer)
    head_dim = hidden_size // num_attention_heads
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE + VOCAB_MULTIPLE,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads,
            "max_position_embeddings": 32768,
            "max_window_layers": num_hidden_layers,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": _mrope_section(head_dim),
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [vision_depth - 1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    randomize_weights(model, seed)
    if with_emb_token:
        penalty = float((decoding or {}).get("repetition_penalty", 1.0))
        install_emb_trigger(model, tokenizer, emb_budget, penalty)
    generation = None if decoding is None else {**_generation_token_ids(ids), **decoding}
    save = save_transformers4 if layout == "transformers4" else save_transformers5
    save(out, model, tokenizer, generation)
    follow_umask(out)
    return out


def _generation_token_ids(ids: dict[str, int]) -> dict[str, Any]:
    """The token ids of the base model's generation config: stop on ``<|im_end|>`` or ``<|endoftext|>``."""
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
    }


def make_test_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A deterministic, structured test image (different seeds give different content)."""
    generator = torch.Generator().manual_seed(seed)
    channels = 1 if mode in ("L", "1", "P") else (4 if mode == "RGBA" else 3)
    low = torch.randint(0, 256, (max(1, height // 8), max(1, width // 8), channels), generator=generator)
    pixels = (
        torch.nn.functional.interpolate(
            low.permute(2, 0, 1)[None].float(), size=(height, width), mode="bilinear", align_corners=False
        )[0]
        .permute(1, 2, 0)
        .round()
        .clamp(0, 255)
        .to(torch.uint8)
    )
    array = pixels.numpy()
    image = Image.fromarray(array[..., 0] if channels == 1 else array, "L" if channels == 1 else mode)
    return image.convert(mode) if image.mode != mode else image


def image_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    """``image`` encoded as ``format`` bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def install_in_hf_cache(checkpoint: str | os.PathLike[str], repo_id: str, cache_dir: str | os.PathLike[str]) -> Path:
    """Place a local checkpoint in a Hugging Face hub cache as ``repo_id``, so hub loading works offline."""
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    revision = "0" * 40
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in Path(checkpoint).iterdir():
        if file.is_file():
            (snapshot / file.name).write_bytes(file.read_bytes())
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]
