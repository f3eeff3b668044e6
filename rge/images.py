"""Images: decoding user images and turning them into Qwen2.5-VL patches under a pixel budget."""

from __future__ import annotations

import io
import os
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any, TypeVar

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

DEFAULT_MIN_PIXELS = 256 * 28 * 28
DEFAULT_MAX_PIXELS = 1024 * 28 * 28
"""The paper's evaluation budget: 256 to 1024 visual tokens per image."""


def pixel_budget(min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
    """``(min_pixels, max_pixels)``: the bounds given, else the paper's; RGEInputError unless both are
    positive ints and the first is not above the second."""
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RGEInputError(f"{name} must be a positive int, got {value!r}")
    low = DEFAULT_MIN_PIXELS if min_pixels is None else min_pixels
    high = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if low > high:
        default = " (the default)"
        raise RGEInputError(f"min_pixels {low}{default if min_pixels is None else ''} is above max_pixels "
                            f"{high}{default if max_pixels is None else ''}")  # fmt: skip
    return low, high


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


class PreparedImage:
    """An image resized to the model's patch grid, whose patches are computed once, when first needed.

    Resizing (the costly part for a large photo) happens when the image is prepared; normalising and
    patching can happen ahead of time in a worker (``prefetch``) so that the thread running the model
    only concatenates ready tensors. The patches are handed over once (``take_pixel_values``) and not
    kept, so an item waiting in a queue holds the resized image only.
    """

    def __init__(
        self, resized: Image.Image, patch_size: int, merge_size: int, to_patches: Callable[[Image.Image], torch.Tensor]
    ) -> None:
        self.resized = resized
        self.grid = (1, resized.height // patch_size, resized.width // patch_size)
        self.tokens = self.grid[1] * self.grid[2] // merge_size**2
        """Visual tokens the model sees for this image (after 2x2 merging)."""
        self._to_patches = to_patches
        self._lock = threading.Lock()
        self._pending: Future[torch.Tensor] | None = None

    def prefetch(
        self,
        executor: Executor,
        convert: Callable[[torch.Tensor], torch.Tensor] | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """Compute the patches in ``executor`` (then ``convert`` them, say to the model's dtype in pinned
        memory); ``on_ready`` is called when they are. Does nothing if they are computed or being computed."""
        with self._lock:
            if self._pending is not None:
                return
            pending = self._pending = executor.submit(self._compute, convert)
        if on_ready is not None:
            pending.add_done_callback(lambda _: on_ready())

    def ready(self) -> bool:
        """Whether the patches are computed (so taking them does not wait)."""
        pending = self._pending
        return pending is not None and pending.done()

    def take_pixel_values(self) -> torch.Tensor:
        """The patches (grid_t * grid_h * grid_w, patch values): prefetched ones (waiting for them if need be),
        else computed now. They are not kept: a later call computes them again."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None and not pending.cancelled() and pending.exception() is None:
            return pending.result()
        return self._compute(None)  # not prefetched, or the prefetch failed (pinned memory, say): plainly now

    def _compute(self, convert: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        patches: torch.Tensor = self._to_patches(self.resized)
        return patches if convert is None else convert(patches)


class VisionPreprocessor:
    """The checkpoint's image processor with the pixel budget applied on every call.

    Some transformers versions ignore ``min_pixels``/``max_pixels`` given at load time; the budget is
    applied here, by the processor's own ``smart_resize``, before the processor is called. Resizing first
    and then running the processor without its resize gives its exact output (tested), in two steps that
    can run at different times.
    """

    def __init__(self, image_processor: Any, min_pixels: int, max_pixels: int) -> None:
        self.image_processor = image_processor
        self.min_pixels, self.max_pixels = pixel_budget(min_pixels, max_pixels)
        self.patch_size: int = image_processor.patch_size
        self.merge_size: int = image_processor.merge_size

    def resized_size(self, image: Image.Image, index: int) -> tuple[int, int]:
        """(width, height) the model sees ``image`` at: a multiple of 28 within the pixel budget."""
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
            raise RGEInputError(
                f"image of size {image.width}x{image.height} is not usable: {exc}", index, "image"
            ) from None
        return width, height

    def prepare(self, image: Image.Image, index: int) -> PreparedImage:
        """``image`` (RGB) resized as the processor resizes it; its patches come later (``PreparedImage``)."""
        size = self.resized_size(image, index)
        resample = getattr(self.image_processor, "resample", Image.Resampling.BICUBIC)
        resized = image if image.size == size else image.resize(size, resample=resample)
        return PreparedImage(resized, self.patch_size, self.merge_size, self.patches)

    def patches(self, resized: Image.Image) -> torch.Tensor:
        """The processor's patches of an image already at its resized size (normalised, flattened)."""
        out = self.image_processor(images=[resized], do_resize=False, return_tensors="pt")
        return out["pixel_values"]  # type: ignore[no-any-return]
