"""Vision preprocessing: a decoded image resized to Qwen2.5-VL's patch grid within a pixel budget, and its
patches, computed once and ahead of time when a worker can."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

import torch
from PIL import Image

from .errors import RGEInputError

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
