"""Fetching an ``http(s)`` image URL: the one fetch the encoder and the server share.

The connection is pinned to the address that was resolved and checked (no re-resolution, so DNS rebinding
cannot reach a private address where those are refused), one deadline covers the whole fetch (a watchdog
shuts the socket when it passes, whatever the far end does), and the body is read within a size limit.
Redirects are followed only as far as the caller allows, each one checked like the first URL.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import RGEInputError

REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class FetchLimits:
    """How an image URL may be fetched, and how refusals name things."""

    timeout: float
    """Seconds for the whole fetch, redirects included."""
    max_bytes: int
    private_allowed: bool = True
    """Whether a host may resolve to a private, loopback or link-local address."""
    max_redirects: int = 0
    use_proxy: bool = False
    """Whether to go through the proxy the environment names (the encoder; the server connects only to addresses
    it checked)."""
    fetcher: str = "rge"
    """Who refuses a large body, in its message ("this server")."""
    quote: Callable[[str], str] = repr
    """How a host or scheme is quoted in a message."""
    check_host: Callable[[str], None] | None = None
    """Called with each host (lowercase) before it is resolved; it raises to refuse it."""


def fetch_url(url: str, limits: FetchLimits, what: str = "image URL", index: int | None = None) -> bytes:
    """The body of ``url`` within ``limits``; else an RGEInputError whose message starts with ``what`` (or
    names the host) and names item ``index``."""
    deadline = time.monotonic() + limits.timeout
    for _ in range(limits.max_redirects + 1):
        body, location = _fetch_once(url, limits, what, index, deadline)
        if location is None:
            return body
        url = urllib.parse.urljoin(url, location)
    raise RGEInputError(f"{what} redirected more than {limits.max_redirects} times", index, "image")


def _fetch_once(
    url: str, limits: FetchLimits, what: str, index: int | None, deadline: float
) -> tuple[bytes, str | None]:
    """The body, or the next URL's ``Location`` when a redirect is allowed."""

    def refuse(message: str) -> RGEInputError:
        return RGEInputError(message, index, "image")

    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as error:
        raise refuse(f"{what} is not valid ({error})") from None
    host = (parts.hostname or "").lower()
    if limits.check_host is not None:
        limits.check_host(host)
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    proxied = _through_proxy(parts, port, _left(deadline)) if limits.use_proxy else None
    if proxied is not None:
        connection, target = proxied
    else:
        address = _checked_address(host, port, limits, deadline, refuse)
        connection = _pinned_connection(parts.scheme, host, port, address, _left(deadline), limits, refuse)
    watchdog = threading.Timer(_left(deadline), _shut, args=(connection,))
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.request("GET", target, headers={"Host": parts.netloc.rpartition("@")[2], "User-Agent": "rge"})
        response = connection.getresponse()
        location = response.getheader("Location")
        if response.status in REDIRECTS and location and limits.max_redirects:
            return b"", location
        if response.status != 200:
            unfollowed = " (redirects are not followed)" if not limits.max_redirects else ""
            raise refuse(f"{what} answered HTTP {response.status}{unfollowed}")
        return _read_limited(response, limits, what, deadline, refuse), None
    except (OSError, http.client.HTTPException) as error:
        if time.monotonic() >= deadline:
            raise refuse(f"{what} took longer than {limits.timeout:g} s to fetch") from None
        raise refuse(f"{what} could not be fetched ({error})") from None
    finally:
        watchdog.cancel()
        connection.close()


def _through_proxy(
    parts: urllib.parse.SplitResult, port: int, timeout: float
) -> tuple[http.client.HTTPConnection, str] | None:
    """A connection through the proxy the environment names for this URL (``HTTPS_PROXY``, ``HTTP_PROXY``,
    ``NO_PROXY``, as urllib reads them) and the request target to send on it; None without one. The proxy
    resolves the host, so no address is checked: ``FetchLimits.use_proxy`` is for the encoder alone."""
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    server = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    proxy_host, proxy_port = server.hostname or "", server.port or 80
    if parts.scheme == "https":
        tunnel = http.client.HTTPSConnection(proxy_host, proxy_port, timeout=timeout)
        tunnel.set_tunnel(parts.hostname or "", port)
        return tunnel, urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    plain = http.client.HTTPConnection(proxy_host, proxy_port, timeout=timeout)
    return plain, urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path or "/", parts.query, ""))


def _left(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())


def _shut(connection: http.client.HTTPConnection) -> None:
    """Wake a read blocked on ``connection`` (the fetch deadline passed)."""
    sock = connection.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _checked_address(
    host: str, port: int, limits: FetchLimits, deadline: float, refuse: Callable[[str], RGEInputError]
) -> str:
    addresses = _resolve(host, port, deadline, limits, refuse)
    if not limits.private_allowed:
        for address in addresses:
            if not ipaddress.ip_address(address.split("%")[0]).is_global:
                raise refuse(f"image host {limits.quote(host)} resolves to a private or loopback address ({address})")
    return addresses[0]


def _resolve(
    host: str, port: int, deadline: float, limits: FetchLimits, refuse: Callable[[str], RGEInputError]
) -> list[str]:
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
        raise refuse(f"image host {limits.quote(host)} was not resolved before the fetch deadline")
    if isinstance(found[0], OSError):
        raise refuse(f"image host {limits.quote(host)} cannot be resolved ({found[0].strerror or found[0]})")
    return list(found[0])


def _pinned_connection(
    scheme: str,
    host: str,
    port: int,
    address: str,
    timeout: float,
    limits: FetchLimits,
    refuse: Callable[[str], RGEInputError],
) -> http.client.HTTPConnection:
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
    raise refuse(f"image URL scheme {limits.quote(scheme)} is not supported")


def _read_limited(
    response: http.client.HTTPResponse,
    limits: FetchLimits,
    what: str,
    deadline: float,
    refuse: Callable[[str], RGEInputError],
) -> bytes:
    limit = limits.max_bytes
    declared = response.getheader("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise refuse(f"{what} body is {declared} bytes; {limits.fetcher} fetches at most {limit}")
    chunks, size = [], 0
    while chunk := response.read1(min(65536, limit + 1 - size)):  # read1: whatever one receive brings
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise refuse(f"{what} body is larger than {limit} bytes")
        if time.monotonic() > deadline:
            raise OSError("deadline")
    if time.monotonic() > deadline:
        raise OSError("deadline")  # the watchdog ended the body
    if declared is not None and declared.isdigit() and size < int(declared):
        raise refuse(f"{what} body ended after {size} of its {declared} bytes")
    return b"".join(chunks)
