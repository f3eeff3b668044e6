"""Images in requests: base64 strings and ``data:`` URIs, and ``http(s)`` URLs only where the operator allows.

The server never reads its own disk for a client: a string that is not base64, a ``data:`` URI or an
allowed URL is refused. URLs are fetched from allow-listed hosts only, over a connection pinned to the
address that was checked (no re-resolution, so DNS rebinding cannot reach a private address), without
following redirects, within a size limit and one deadline for the whole fetch (a watchdog shuts the
socket when it passes, whatever the far end does). Image dimensions are checked from the header before
any pixel is decoded, against the per-image limit and the request's remaining pixel budget.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import io
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..errors import RGEError
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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise ImageRejected(
                    f"image is {image.width}x{image.height} pixels; this server accepts at most {max_pixels} pixels"
                )
            if budget is not None:
                budget.spend(image.width, image.height)
            image.load()
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("image cannot be decoded (not a known image format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
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
    """The body of an allowed ``http(s)`` image URL, within the server's size limit and fetch deadline."""
    deadline = time.monotonic() + settings.image_fetch_timeout
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as error:
        raise ImageRejected(f"image URL is not valid ({error})") from None
    host = (parts.hostname or "").lower()
    if not settings.image_hosts:
        raise ImageRejected("image URLs are disabled on this server; send the image as base64 or a data: URI")
    if not host_allowed(host, settings.image_hosts):
        raise ImageRejected(f"image host {show(host)} is not allowed on this server")
    address = _checked_address(host, port, settings.private_image_hosts, deadline)
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    connection = _pinned_connection(parts.scheme, host, port, address, _left(deadline))
    watchdog = threading.Timer(_left(deadline), _shut, args=(connection,))
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.request("GET", target, headers={"Host": parts.netloc.rpartition("@")[2], "User-Agent": "rge"})
        response = connection.getresponse()
        if response.status != 200:
            raise ImageRejected(f"image URL answered HTTP {response.status} (redirects are not followed)")
        return _read_limited(response, settings.image_fetch_max_bytes, deadline)
    except (OSError, http.client.HTTPException) as error:
        if time.monotonic() >= deadline:
            raise ImageRejected(f"image URL took longer than {settings.image_fetch_timeout:g} s to fetch") from None
        raise ImageRejected(f"image URL could not be fetched ({error})") from None
    finally:
        watchdog.cancel()
        connection.close()


def _left(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())


def _shut(connection: http.client.HTTPConnection) -> None:
    """Wake a read blocked on ``connection`` (the fetch deadline passed)."""
    sock = connection.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """``host`` is listed, or is a subdomain of a listed ``.domain`` entry."""
    for entry in (entry.lower() for entry in allowed):
        if host == entry or (entry.startswith(".") and (host.endswith(entry) or host == entry[1:])):
            return True
    return False


def _checked_address(host: str, port: int, private_allowed: bool, deadline: float) -> str:
    addresses = _resolve(host, port, deadline)
    if not private_allowed:
        for address in addresses:
            if not ipaddress.ip_address(address.split("%")[0]).is_global:
                raise ImageRejected(f"image host {show(host)} resolves to a private or loopback address ({address})")
    return addresses[0]


def _resolve(host: str, port: int, deadline: float) -> list[str]:
    """The addresses of ``host``, looked up in a thread of its own so that a slow resolver meets the deadline."""
    found: list[Any] = []

    def lookup() -> None:
        try:
            found.append([str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)])
        except OSError as error:
            found.append(error)

    thread = threading.Thread(target=lookup, daemon=True, name="rge-resolve")
    thread.start()
    thread.join(_left(deadline))
    if not found:
        raise ImageRejected(f"image host {show(host)} was not resolved before the fetch deadline")
    if isinstance(found[0], OSError):
        raise ImageRejected(f"image host {show(host)} cannot be resolved ({found[0].strerror or found[0]})")
    return list(found[0])


def _pinned_connection(scheme: str, host: str, port: int, address: str, timeout: float) -> http.client.HTTPConnection:
    """A connection to ``address`` (already checked) that presents ``host`` for HTTP and TLS. Its socket is
    on the connection before it connects and before the TLS handshake, so the fetch's watchdog can cut
    either short."""

    def open_socket(connection: http.client.HTTPConnection) -> socket.socket:
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
        connection.sock = sock
        sock.settimeout(timeout)
        sock.connect((address, port))
        return sock

    class Pinned(http.client.HTTPConnection):
        def connect(self) -> None:
            open_socket(self)

    class PinnedTLS(http.client.HTTPSConnection):
        def connect(self) -> None:
            tls = ssl.create_default_context().wrap_socket(open_socket(self), server_hostname=host,
                                                           do_handshake_on_connect=False)  # fmt: skip
            self.sock = tls
            tls.do_handshake()

    if scheme == "https":
        return PinnedTLS(host, port, timeout=timeout)
    if scheme == "http":
        return Pinned(host, port, timeout=timeout)
    raise ImageRejected(f"image URL scheme {show(scheme)} is not supported")


def _read_limited(response: http.client.HTTPResponse, limit: int, deadline: float) -> bytes:
    declared = response.getheader("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ImageRejected(f"image URL body is {declared} bytes; this server fetches at most {limit}")
    chunks, size = [], 0
    while chunk := response.read1(min(65536, limit + 1 - size)):  # read1: whatever one receive brings
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise ImageRejected(f"image URL body is larger than {limit} bytes")
        if time.monotonic() > deadline:
            raise OSError("deadline")
    if time.monotonic() > deadline:
        raise OSError("deadline")  # the watchdog ended the body
    if declared is not None and declared.isdigit() and size < int(declared):
        raise ImageRejected(f"image URL body ended after {size} of its {declared} bytes")
    return b"".join(chunks)
