"""Images: decoding user images and turning them into Qwen2.5-VL patches under a pixel budget."""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import RGEInputError
from .types import ImageInput

MIN_SIDE = 28
"""Images with a side under this are resized up to it on that side first, as the reference does."""

URL_TIMEOUT_SECONDS = 20.0
URL_MAX_BYTES = 64 * 2**20
"""An ``http(s)`` image is fetched within this time and size, or refused naming the item."""

DEFAULT_MIN_PIXELS = 256 * 28 * 28
DEFAULT_MAX_PIXELS = 1024 * 28 * 28
"""The paper's evaluation budget: 256 to 1024 visual tokens per image."""


def load_image(image: ImageInput, index: int, *, exif_transpose: bool = True) -> Image.Image:
    """Decode ``image`` fully (so that corrupt data fails here) and upsize sides under 28 px.

    ``image`` is a PIL image, a path, an ``http(s)`` URL, encoded bytes, or a numpy array / torch tensor
    (HWC or CHW; uint8, or float in [0, 1]). Raises RGEInputError naming ``index`` for a missing,
    unreadable, empty or unsupported image.
    """
    if isinstance(image, Image.Image):
        opened = image
    elif isinstance(image, str) and image.startswith(("http://", "https://")):
        opened = _open(io.BytesIO(fetch_url(image, index)), index, f"image at {image!r}")
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        opened = from_array(image, index)
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise RGEInputError(f"image file not found: {str(path)!r}", index)
        opened = _open(path, index, f"image file {str(path)!r}")
    elif isinstance(image, (bytes, bytearray, memoryview)):
        opened = _open(io.BytesIO(bytes(image)), index, "image bytes")
    else:
        raise RGEInputError(
            f"unsupported image type {type(image).__name__}; expected a PIL image, a path, an http(s) URL, "
            "bytes, or a numpy array / torch tensor",
            index,
        )
    if opened.width == 0 or opened.height == 0:
        raise RGEInputError(f"image has zero size ({opened.width}x{opened.height})", index)
    if exif_transpose:
        opened = ImageOps.exif_transpose(opened)
    try:
        return to_rgb(upsize_small_sides(opened))
    except (ValueError, OSError) as exc:
        raise RGEInputError(f"image of mode {opened.mode!r} cannot be converted to RGB ({exc})", index) from None


def fetch_url(url: str, index: int) -> bytes:
    """The body of ``url``, within ``URL_TIMEOUT_SECONDS`` and ``URL_MAX_BYTES``, or an RGEInputError."""
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_SECONDS) as response:  # noqa: S310 - http(s) only
            body = response.read(URL_MAX_BYTES + 1)
    except urllib.error.HTTPError as error:
        raise RGEInputError(f"image URL {url!r} answered HTTP {error.code}", index) from None
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise RGEInputError(f"image URL {url!r} could not be fetched ({reason})", index) from None
    if len(body) > URL_MAX_BYTES:
        raise RGEInputError(f"image URL {url!r} is larger than {URL_MAX_BYTES} bytes", index)
    return body


def from_array(array: np.ndarray | torch.Tensor, index: int) -> Image.Image:
    """An image from pixels: (H, W), (H, W, C) or (C, H, W) with 1, 3 or 4 channels; uint8, or float in [0, 1]."""
    pixels = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if pixels.ndim == 3 and pixels.shape[-1] not in (1, 3, 4) and pixels.shape[0] in (1, 3, 4):
        pixels = np.moveaxis(pixels, 0, -1)  # CHW -> HWC
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)):
        raise RGEInputError(f"an image array must be HW, HWC or CHW with 1, 3 or 4 channels, got {pixels.shape}", index)
    if pixels.dtype.kind == "f":
        if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
            raise RGEInputError("a float image array must hold finite values in [0, 1]", index)
        pixels = np.round(pixels * 255)
    elif pixels.dtype != np.uint8:
        raise RGEInputError(f"an image array must be uint8 or float, got {pixels.dtype}", index)
    return Image.fromarray(np.ascontiguousarray(pixels.astype(np.uint8)))


def _open(source: Path | io.BytesIO, index: int, what: str) -> Image.Image:
    try:
        opened = Image.open(source)
        opened.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise RGEInputError(f"{what} cannot be decoded as an image ({exc})", index) from None
    return opened


def upsize_small_sides(image: Image.Image) -> Image.Image:
    """Resize a side under 28 px up to 28, width first then height, as the authors' evaluation does."""
    if image.width < MIN_SIDE:
        image = image.resize((MIN_SIDE, image.height))
    if image.height < MIN_SIDE:
        image = image.resize((image.width, MIN_SIDE))
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the image processor makes it: transparency is composited onto white."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


class VisionPreprocessor:
    """The checkpoint's image processor with the pixel budget applied on every call.

    Some transformers versions ignore ``min_pixels``/``max_pixels`` given at load time; passing the size
    (``shortest_edge``/``longest_edge`` in pixels) with each call makes the cap real.
    """

    def __init__(self, image_processor: Any, min_pixels: int, max_pixels: int) -> None:
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
        self.image_processor = image_processor
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.patch_size: int = image_processor.patch_size
        self.merge_size: int = image_processor.merge_size

    def token_count(self, image: Image.Image, index: int) -> int:
        """Visual tokens the model will see for ``image`` (after 2x2 merging), from its size alone."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        try:
            height, width = smart_resize(
                image.height,
                image.width,
                factor=self.patch_size * self.merge_size,
                min_pixels=self.min_pixels,
                max_pixels=self.max_pixels,
            )
        except ValueError as exc:
            raise RGEInputError(f"image of size {image.width}x{image.height} is not usable: {exc}", index) from None
        return (height // self.patch_size) * (width // self.patch_size) // self.merge_size**2

    def __call__(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches of all ``images`` concatenated, and their (t, h, w) grids, one row per image."""
        out = self.image_processor(
            images=images,
            size={"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            return_tensors="pt",
        )
        return out["pixel_values"], out["image_grid_thw"]
