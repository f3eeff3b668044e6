"""Types of rge's public API, in one place."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import numpy as np
import torch
from PIL import Image

ImageInput = Image.Image | str | os.PathLike[str] | bytes
"""An image: a PIL image, a path to an image file, or the raw bytes of an encoded image."""


class MultimodalItem(TypedDict, total=False):
    """One item as a dict: ``{"text": ..., "image": ...}``; either key may be omitted."""

    text: str
    image: ImageInput | None


TextInput = str | MultimodalItem | Mapping[str, Any]
EncodeInput = TextInput | Sequence[TextInput]
Embeddings = np.ndarray | torch.Tensor
