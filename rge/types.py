"""Types of rge's public API, in one place."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, TypedDict

import numpy as np
import torch
from PIL import Image

ImageInput = Image.Image | str | os.PathLike[str] | bytes | np.ndarray | torch.Tensor
"""An image: a PIL image, a path or ``http(s)`` URL of an image file, the raw bytes of an encoded image, or
pixels as a numpy array or torch tensor (HWC or CHW; uint8, or float in [0, 1])."""


class MultimodalItem(TypedDict, total=False):
    """One item as a dict: ``{"text": ..., "image": ...}``; either key may be omitted."""

    text: str
    image: ImageInput | None


TextInput = str | MultimodalItem | Mapping[str, Any]
EncodeInput = TextInput | Iterable[TextInput]
"""One item, or any sequence or iterable of items (list, tuple, numpy array, pandas Series, generator)."""
Embeddings = np.ndarray | torch.Tensor
