"""Images in requests: base64 strings and ``data:`` URIs, and ``http(s)`` URLs only where the operator allows.

The server never reads its own disk for a client: a string that is not base64, a ``data:`` URI or an
allowed URL is refused. URLs are fetched (``rge.fetching``) from allow-listed hosts only, from public
addresses unless the operator allows private ones, without following redirects, within the server's size
limit and deadline. Image dimensions are checked from the header before any pixel is decoded
(``rge.images.open_image``), against the per-image limit and the request's remaining pixel budget.
"""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image

from .. import fetching, images
from ..errors import RGEError, RGEInputError
from ..fetching import FetchLimits
from .protocol import show
from .settings import ServerSettings


class ImageRejected(RGEError, ValueError):
    """An image in a request cannot be used; the message says why (the caller adds the item index)."""


class PixelBudget:
    """The decoded pixels one request may still use (``max_request_pixels``), spent image by image."""

    def __init__(self, pixels: int) -> None:
        self.total = self.left = pixels

    def spend(self, width: int, height: int) -> None:
        if width * height > self.left:
            raise ImageRejected(f"the request's images hold more than {self.total} pixels together, the most this "
                                "server decodes for one request; send fewer or smaller images")  # fmt: skip
        self.left -= width * height


def image_bytes(value: str, settings: ServerSettings) -> bytes:
    """The encoded image a request's base64 string or ``data:`` URI holds, or an allowed URL's body."""
    if is_url(value):
        return fetch_url(value, settings)
    if value.startswith("data:"):
        return _data_uri(value)
    return _base64(value)


def is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def open_image(data: bytes, max_pixels: int, budget: PixelBudget | None = None) -> Image.Image:
    """Decode ``data``, refusing before decoding pixels when the image is larger than ``max_pixels`` or than
    what is left of ``budget``."""

    def limit(width: int, height: int) -> None:
        if width * height > max_pixels:
            raise ImageRejected(f"image is {width}x{height} pixels; this server accepts at most {max_pixels} pixels")
        if budget is not None:
            budget.spend(width, height)

    try:
        return images.open_image(io.BytesIO(data), limit=limit)
    except RGEInputError as error:
        raise ImageRejected(error.reason) from None


def _data_uri(value: str) -> bytes:
    header, comma, payload = value.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ImageRejected("a data: URI image must be base64-encoded (data:image/png;base64,...)")
    return _base64(payload)


def _base64(value: str) -> bytes:
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageRejected(
            "image must be base64, a data: URI or an http(s) URL (file paths are not read by the server)"
        ) from None
    if not data:
        raise ImageRejected("image is empty")
    return data


def fetch_url(url: str, settings: ServerSettings) -> bytes:
    """The body of an allowed ``http(s)`` image URL, within the server's size limit and fetch deadline, from a
    public address unless private ones are allowed, without following redirects."""

    def check_host(host: str) -> None:
        if not settings.image_hosts:
            raise ImageRejected("image URLs are disabled on this server; send the image as base64 or a data: URI")
        if not host_allowed(host, settings.image_hosts):
            raise ImageRejected(f"image host {show(host)} is not allowed on this server")

    limits = FetchLimits(settings.image_fetch_timeout, settings.image_fetch_max_bytes, settings.private_image_hosts,
                         fetcher="this server", quote=show, check_host=check_host)  # fmt: skip
    try:
        return fetching.fetch_url(url, limits)
    except RGEInputError as error:
        raise ImageRejected(error.reason) from None


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """``host`` is listed, or is a subdomain of a listed ``.domain`` entry."""
    for entry in (entry.lower() for entry in allowed):
        if host == entry or (entry.startswith(".") and (host.endswith(entry) or host == entry[1:])):
            return True
    return False
