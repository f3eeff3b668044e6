"""Types of rge's public API, in one place: inputs, options, results and what an encoder is."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypedDict, runtime_checkable

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from typing_extensions import Unpack

ImageInput = Image.Image | str | os.PathLike[str] | bytes | np.ndarray | torch.Tensor
"""An image: a PIL image, a path or ``http(s)`` URL of an image file, the raw bytes of an encoded image, or
pixels as a numpy array or torch tensor (HWC or CHW; uint8, or float in [0, 1])."""


class MultimodalItem(TypedDict, total=False):
    """One item as a dict: ``{"text": ..., "image": ...}``; either key may be omitted."""

    text: str
    image: ImageInput | None


ITEM_KEYS: tuple[str, ...] = tuple(MultimodalItem.__annotations__)
"""The keys an item dict may have (``"text"``, ``"image"``), for the encoder, the server and training data."""

TextInput = str | MultimodalItem | Mapping[str, Any]
"""One item: a text, or a ``{"text", "image"}`` dict."""
EncodeInput = TextInput | Iterable[TextInput]
"""One item, or any sequence or iterable of items (list, tuple, numpy array, pandas Series, generator)."""
ImagesInput = Sequence[ImageInput | None] | ImageInput | None
"""``encode``'s ``images``: one per text in a list or tuple (``None`` for a text without one), or one image."""
Embeddings = np.ndarray | torch.Tensor

KVCache = Literal["auto", "static", "preallocated", "dynamic"]
"""The query path's KV cache: ``"static"`` (preallocated, fixed-shape decode steps replayed as CUDA graphs on
CUDA), ``"preallocated"`` (the same cache, eager steps), ``"dynamic"`` (transformers' ``DynamicCache``) or
``"auto"`` (static on CUDA, dynamic elsewhere)."""
DTypeName = Literal["float32", "bfloat16", "float16"]
"""A model dtype by name (a ``torch.dtype`` works too)."""
AttnImplementation = Literal["sdpa", "flash_attention_2", "eager"]
"""The model's attention: sdpa, flash-attention 2 (``pip install rge-embeddings[gpu]``) or transformers' eager."""
PromptName = Literal[
    "image_retrieval", "caption_retrieval", "document_retrieval", "vqa", "classification", "grounding",
    "image_retrieval_query", "image_retrieval_document", "caption_retrieval_query", "caption_retrieval_document",
    "document_retrieval_query", "document_retrieval_document", "vqa_query", "vqa_document",
    "classification_query", "classification_document", "grounding_query", "grounding_document",
]  # fmt: skip
"""A task of ``rge.prompts.TASK_PROMPTS`` (its instruction for the side being encoded), or one full name."""
CorpusSide = Literal["query", "document"]
"""Which path a corpus is encoded on: queries reason first, documents do not."""


class EncodeOptions(TypedDict, total=False):
    """The keyword options every ``encode*`` method takes, besides those that choose the return type."""

    reason: bool
    batch_size: int
    normalize: bool
    show_progress_bar: bool | None
    max_new_tokens: int | None
    exif_transpose: bool
    repetition_penalty: float | None
    prompt: str | None
    prompt_name: PromptName | None


class Rationales(list[str]):
    """The rationales of an ``encode`` call, in input order ("" on the candidate path).

    ``token_ids`` holds, per item, the token ids the query path generated (``<emb>`` included when it was
    emitted; empty on the candidate path) and ``num_generated_tokens`` their counts.
    """

    def __init__(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> None:
        super().__init__(texts)
        self.token_ids = [list(ids) for ids in token_ids]
        self.num_generated_tokens = [len(ids) for ids in self.token_ids]

    def __repr__(self) -> str:
        return f"Rationales({list(self)!r}, num_generated_tokens={self.num_generated_tokens})"


EncodeResult = Embeddings | tuple[Embeddings, Rationales | str]
"""What ``encode`` returns when its switches are not known statically."""


@runtime_checkable
class EncoderProtocol(Protocol):
    """An encoder, as rge's corpus jobs and Ray workers use one: ``RGEEncoder`` is one, and so is anything
    with these members (``isinstance`` checks that they exist). ``RGEEncoder``'s own methods say more precisely
    what they return: an array, a tensor, or a pair with the rationales.
    """

    @property
    def embedding_dim(self) -> int: ...

    def encode(
        self, texts: EncodeInput | None = None, images: ImagesInput = None, *, convert_to_numpy: bool = True,
        convert_to_tensor: bool = False, return_rationales: bool = False, **options: Unpack[EncodeOptions],
    ) -> Any: ...  # fmt: skip

    def encode_query(
        self, texts: EncodeInput | None = None, images: ImagesInput = None, *, convert_to_numpy: bool = True,
        convert_to_tensor: bool = False, return_rationales: bool = False, **options: Unpack[EncodeOptions],
    ) -> Any: ...  # fmt: skip

    def encode_document(
        self, texts: EncodeInput | None = None, images: ImagesInput = None, *, convert_to_numpy: bool = True,
        convert_to_tensor: bool = False, return_rationales: bool = False, **options: Unpack[EncodeOptions],
    ) -> Any: ...  # fmt: skip
