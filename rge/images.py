"""Decoding user images: a PIL image, a path, an ``http(s)`` URL, bytes or an array becomes an upright RGB
image (or an RGEInputError naming the item). ``rge.vision`` resizes it and makes the model's patches."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from . import fetching
from .errors import RGEInputError
from .fetching import FetchLimits
from .types import ImageInput

T = TypeVar("T")

MIN_SIDE = 28
"""Images with a side under this are resized up to it on that side first, as the reference does."""

URL_TIMEOUT_SECONDS = 20.0
URL_MAX_BYTES = 64 * 2**20
URL_MAX_REDIRECTS = 10
"""An ``http(s)`` image is fetched within this time, size and number of redirects, or refused naming the item."""


def load_image(image: ImageInput, index: int, *, exif_transpose: bool = True) -> Image.Image:
    """Decode ``image`` fully (so that corrupt data fails here) and upsize sides under 28 px.

    ``image`` is a PIL image, a path, an ``http(s)`` URL, encoded bytes, or a numpy array / torch tensor
    (HWC or CHW; uint8, or float in [0, 1]). Raises RGEInputError naming ``index`` for a missing,
    unreadable, empty or unsupported image.
    """
    if isinstance(image, Image.Image):
        opened = load_pil(image, index)
    elif isinstance(image, str) and image.startswith(("http://", "https://")):
        opened = open_image(io.BytesIO(fetch_url(image, index)), f"image at {image!r}", index)
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        opened = from_array(image, index)
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise RGEInputError(f"image file not found: {str(path)!r}", index, "image")
        opened = open_image(path, f"image file {str(path)!r}", index)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        opened = open_image(io.BytesIO(bytes(image)), "image bytes", index)
    else:
        raise RGEInputError(
            f"unsupported image type {type(image).__name__}; expected a PIL image, a path, an http(s) URL, "
            "bytes, or a numpy array / torch tensor",
            index,
            "image",
        )
    if opened.width == 0 or opened.height == 0:
        raise RGEInputError(f"image has zero size ({opened.width}x{opened.height})", index, "image")
    if exif_transpose and opened.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        opened = ImageOps.exif_transpose(opened)  # (it copies even an upright image: asked only when needed)
    try:
        return to_rgb(upsize_small_sides(opened))
    except (ValueError, OSError) as exc:
        raise RGEInputError(
            f"image of mode {opened.mode!r} cannot be converted to RGB ({exc})", index, "image"
        ) from None


def fetch_url(url: str, index: int) -> bytes:
    """The body of ``url``, within ``URL_TIMEOUT_SECONDS`` and ``URL_MAX_BYTES`` (redirects followed), or an
    RGEInputError naming item ``index``."""
    limits = FetchLimits(URL_TIMEOUT_SECONDS, URL_MAX_BYTES, max_redirects=URL_MAX_REDIRECTS, use_proxy=True)
    return fetching.fetch_url(url, limits, f"image URL {url!r}", index)


def from_array(array: np.ndarray | torch.Tensor, index: int) -> Image.Image:
    """An image from pixels: (H, W), (H, W, C) or (C, H, W) with 1, 3 or 4 channels; uint8, or float in [0, 1]."""
    pixels = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if pixels.ndim == 3 and pixels.shape[-1] not in (1, 3, 4) and pixels.shape[0] in (1, 3, 4):
        pixels = np.moveaxis(pixels, 0, -1)  # CHW -> HWC
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)):
        raise RGEInputError(
            f"an image array must be HW, HWC or CHW with 1, 3 or 4 channels, got {pixels.shape}", index, "image"
        )
    if pixels.dtype.kind == "f":
        if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
            raise RGEInputError("a float image array must hold finite values in [0, 1]", index, "image")
        pixels = np.round(pixels * 255)
    elif pixels.dtype != np.uint8:
        raise RGEInputError(f"an image array must be uint8 or float, got {pixels.dtype}", index, "image")
    return Image.fromarray(np.ascontiguousarray(pixels.astype(np.uint8)))


def load_pil(image: Image.Image, index: int) -> Image.Image:
    """A caller's PIL image with its pixels decoded (a lazily opened file is read now, not in a worker that
    might share it with another); RGEInputError naming ``index`` if its data is corrupt."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise RGEInputError(f"PIL image cannot be decoded ({exc})", index, "image") from None
    return image


def open_image(
    source: Path | io.BytesIO,
    what: str = "image",
    index: int | None = None,
    *,
    limit: Callable[[int, int], None] | None = None,
) -> Image.Image:
    """Decode the image in ``source`` fully, or raise an RGEInputError naming ``what`` and item ``index``.

    ``limit``, when given, is called with the width and height read from the header, before any pixel is
    decoded, and raises to refuse; PIL's decompression-bomb warning then refuses the image too.
    """
    with warnings.catch_warnings():
        if limit is not None:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
        opened = _decoding(lambda: Image.open(source), what, index)
        if limit is not None:
            limit(opened.width, opened.height)
        _decoding(opened.load, what, index)
    return opened


def _decoding(step: Callable[[], T], what: str, index: int | None) -> T:
    try:
        return step()
    except UnidentifiedImageError:
        raise RGEInputError(f"{what} cannot be decoded (not a known image format)", index, "image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:  # fmt: skip
        raise RGEInputError(f"{what} cannot be decoded ({exc})", index, "image") from None


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
