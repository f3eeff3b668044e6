"""Types of rge's public API, in one place."""

from __future__ import annotations

import os
from typing import TypedDict, Union

import numpy as np
import torch
from PIL import Image

ImageInput = Union[Image.Image, str, "os.PathLike[str]", bytes]
"""An image: a PIL image, a path to an image file, or the raw bytes of an encoded image."""


class MultimodalItem(TypedDict, total=False):
    """One item as a dict: ``{"text": ..., "image": ...}``; either key may be omitted."""

    text: str
    image: ImageInput | None


TextInput = Union[str, MultimodalItem]
EncodeInput = Union[TextInput, list[TextInput]]
Embeddings = Union[np.ndarray, torch.Tensor]
