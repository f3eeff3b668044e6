"""User inputs -> validated items (text with its image placed, decoded image), before any model work."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .errors import RGEInputError
from .images import load_image, load_pil
from .prompts import EMB_TOKEN, IMAGE_PAD_TOKEN, VISION_BLOCK, count_image_slots, place_image
from .types import ITEM_KEYS, EncodeInput, ImageInput


@dataclass(frozen=True)
class Item:
    """One input ready for prompting: its user text (vision block in place) and its decoded image."""

    text: str
    image: Image.Image | None


def split_inputs(
    texts: EncodeInput | None, images: Sequence[ImageInput | None] | ImageInput | None = None
) -> tuple[list[tuple[str, ImageInput | None]], bool]:
    """The ``(text, image)`` pairs of ``encode``'s inputs, and whether the input was single; cheap checks only
    (types, counts, reserved tokens), nothing decoded yet but PIL images opened lazily by the caller.

    ``texts`` may be a str or dict (one item), or any sequence or iterable of them (list, tuple, numpy
    array, pandas Series, generator); ``None`` with ``images`` embeds the images alone. Every problem
    raises RGEInputError naming the item index.
    """
    if texts is None:
        if images is None:
            raise RGEInputError("give texts, images or both")
        single = not _is_image_list(images)
        entries: list[Any] = [""] * (1 if single else len(images))  # type: ignore[arg-type]
    else:
        single = isinstance(texts, (str, Mapping))
        entries = [texts] if single else _as_list(texts)
    pairs = [_split_entry(entry, index) for index, entry in enumerate(entries)]
    if images is not None:
        pairs = _attach_images(pairs, [images] if single and not _is_image_list(images) else images)
    for index, (_, image) in enumerate(pairs):
        if isinstance(image, Image.Image):
            load_pil(image, index)  # the caller's objects: read here, never by two workers at once
    return pairs, single


def _as_list(texts: object) -> list[Any]:
    """Any container of items as a list (numpy arrays and pandas Series through ``tolist``)."""
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
        raise RGEInputError(f"texts must be a str, a dict or a sequence of them, got {type(texts).__name__}")
    tolist = getattr(texts, "tolist", None)
    return list(tolist()) if callable(tolist) else list(texts)


def _is_image_list(images: object) -> bool:
    """A list of images (one per item), as opposed to one image: a list or tuple, never an array."""
    return isinstance(images, (list, tuple))


def _split_entry(entry: object, index: int) -> tuple[str, ImageInput | None]:
    if isinstance(entry, Mapping):
        unknown = set(entry) - set(ITEM_KEYS)
        if unknown:
            allowed = ", ".join(map(repr, ITEM_KEYS))
            raise RGEInputError(f"unknown keys {sorted(unknown)} in item dict; allowed: {allowed}", index)
        text = entry.get("text", "")
        return _check_text(text, index), entry.get("image")
    return _check_text(entry, index), None


def _check_text(text: object, index: int) -> str:
    if text is None:
        raise RGEInputError("text is None", index)
    if not isinstance(text, str):
        raise RGEInputError(f"text must be a str, got {type(text).__name__}", index)
    if EMB_TOKEN in text:
        raise RGEInputError(f"text contains the reserved token {EMB_TOKEN}", index)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RGEInputError(f"text is not valid Unicode ({exc.reason} at position {exc.start})", index) from None
    return text


def _attach_images(pairs: list[tuple[str, ImageInput | None]], images: Any) -> list[tuple[str, ImageInput | None]]:
    if not _is_image_list(images):
        raise RGEInputError(f"images must be a list (one entry per text), got {type(images).__name__}")
    if len(images) != len(pairs):
        raise RGEInputError(f"got {len(pairs)} texts but {len(images)} images; give one image entry (or None) per text")
    attached = []
    for index, ((text, own_image), image) in enumerate(zip(pairs, images)):
        if own_image is not None and image is not None:
            raise RGEInputError("image given both in the item dict and in images", index)
        attached.append((text, own_image if own_image is not None else image))
    return attached


def make_item(text: str, image: ImageInput | None, index: int, exif_transpose: bool, prompt: str) -> Item:
    """One item's text with its image placed and its image decoded (the costly part of preparing it)."""
    slots = count_image_slots(text)
    if slots > 1:
        raise RGEInputError(f"text has {slots} image markers but an item holds at most one image", index)
    if slots == 1 and image is None:
        raise RGEInputError("text has an image marker but no image was given", index)
    decoded = None if image is None else load_image(image, index, exif_transpose=exif_transpose)
    if decoded is None and not text:
        raise RGEInputError("empty text and no image: nothing to embed", index)
    placed = place_image(prompt + text, decoded is not None)
    if placed.count(IMAGE_PAD_TOKEN) != placed.count(VISION_BLOCK):
        raise RGEInputError(f"text contains {IMAGE_PAD_TOKEN} outside a vision block", index)
    return Item(text=placed, image=decoded)
