"""Images in requests: base64 strings and ``data:`` URIs, and ``http(s)`` URLs only where the operator allows.

The server never reads its own disk for a client: a string that is not base64, a ``data:`` URI or an
allowed URL is refused. URLs are fetched from allow-listed hosts only, over a connection pinned to the
address that was checked (no re-resolution, so DNS rebinding cannot reach a private address), without
following redirects, within a size and time limit. Image dimensions are checked from the header before
any pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import socket
import ssl
import time
import urllib.parse
import warnings

from PIL import Image, UnidentifiedImageError

from .settings import ServerSettings


class ImageRejected(ValueError):
    """An image in a request cannot be used; the message says why (the caller adds the item index)."""


def decode_image(value: object, settings: ServerSettings) -> Image.Image:
    """A request's image field -> a fully decoded PIL image within the server's pixel limit."""
    if not isinstance(value, str):
        raise ImageRejected(f"image must be a string (base64 or a data: URI), got {type(value).__name__}")
    if value.startswith(("http://", "https://")):
        data = fetch_url(value, settings)
    elif value.startswith("data:"):
        data = _data_uri(value)
    else:
        data = _base64(value)
    return open_image(data, settings.max_image_pixels)


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode ``data``, refusing before decoding pixels when the image is larger than ``max_pixels``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise ImageRejected(
                    f"image is {image.width}x{image.height} pixels; this server accepts at most {max_pixels} pixels"
                )
            image.load()
    except ImageRejected:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as error:  # fmt: skip
        raise ImageRejected(f"image cannot be decoded ({error})") from None
    return image


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
    """The body of an allowed ``http(s)`` image URL, within the server's size and time limits."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    if not settings.image_hosts:
        raise ImageRejected("image URLs are disabled on this server; send the image as base64 or a data: URI")
    if not host_allowed(host, settings.image_hosts):
        raise ImageRejected(f"image host {host!r} is not allowed on this server")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = _checked_address(host, port, settings.private_image_hosts)
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    connection = _pinned_connection(parts.scheme, host, port, address, settings.image_fetch_timeout)
    deadline = time.monotonic() + settings.image_fetch_timeout
    try:
        connection.request("GET", target, headers={"Host": parts.netloc.rpartition("@")[2], "User-Agent": "rge"})
        response = connection.getresponse()
        if response.status != 200:
            raise ImageRejected(f"image URL answered HTTP {response.status} (redirects are not followed)")
        return _read_limited(response, settings.image_fetch_max_bytes, deadline)
    except (OSError, http.client.HTTPException) as error:
        raise ImageRejected(f"image URL could not be fetched ({error})") from None
    finally:
        connection.close()


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """``host`` is listed, or is a subdomain of a listed ``.domain`` entry."""
    for entry in (entry.lower() for entry in allowed):
        if host == entry or (entry.startswith(".") and (host.endswith(entry) or host == entry[1:])):
            return True
    return False


def _checked_address(host: str, port: int, private_allowed: bool) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise ImageRejected(f"image host {host!r} cannot be resolved ({error})") from None
    addresses = [str(info[4][0]) for info in infos]
    if not private_allowed:
        for address in addresses:
            if not ipaddress.ip_address(address.split("%")[0]).is_global:
                raise ImageRejected(f"image host {host!r} resolves to a private or loopback address ({address})")
    return addresses[0]


def _pinned_connection(scheme: str, host: str, port: int, address: str, timeout: float) -> http.client.HTTPConnection:
    """A connection to ``address`` (already checked) that presents ``host`` for HTTP and TLS."""

    class Pinned(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.create_connection((address, port), timeout)

    class PinnedTLS(http.client.HTTPSConnection):
        def connect(self) -> None:
            sock = socket.create_connection((address, port), timeout)
            self.sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)

    if scheme == "https":
        return PinnedTLS(host, port, timeout=timeout)
    if scheme == "http":
        return Pinned(host, port, timeout=timeout)
    raise ImageRejected(f"image URL scheme {scheme!r} is not supported")


def _read_limited(response: http.client.HTTPResponse, limit: int, deadline: float) -> bytes:
    declared = response.getheader("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ImageRejected(f"image URL body is {declared} bytes; this server fetches at most {limit}")
    chunks, size = [], 0
    while chunk := response.read(min(65536, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise ImageRejected(f"image URL body is larger than {limit} bytes")
        if time.monotonic() > deadline:
            raise ImageRejected("image URL took longer than the fetch timeout")
    return b"".join(chunks)
