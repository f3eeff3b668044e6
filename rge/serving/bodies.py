"""Request bodies: read within a size limit, refused by shape before parsing, parsed off the event loop.

Python's JSON parser holds the interpreter lock while it runs, so parsing a body made of millions of
small values would stall every other request even in a worker thread. ``check_shape`` first counts the
body's values outside strings and stops as soon as the limit is passed; only a body that fits is parsed.
The scan is linear and works in slices of ``SLICE`` bytes (each a compiled expression's single step),
so it never holds the interpreter lock for long either, whatever the body holds.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import RGEError
from .protocol import APIError, invalid

_STRUCTURE = re.compile(rb'["\[{,]')
_IN_STRING = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)
SLICE = 1 << 18
"""Bytes one step of the shape scan looks at (a few milliseconds of work)."""


class BodyTooLarge(RGEError):
    """Raised while a body is read, once it passes the limit (the app answers 413)."""


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, declared or streamed."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            message = f"the request body is {int(declared)} bytes; this server accepts at most {self.limit}"
            await send_error(send, APIError(413, message))
            return
        received = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(f"the request body is over {self.limit} bytes, the most this server accepts")
            return message

        await self.app(scope, limited_receive, send)


async def send_error(send: Any, error: APIError) -> None:
    """Answer ``error`` directly over ASGI (outside the app's routes), closing the connection."""
    headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
    headers += [(key.lower().encode(), value.encode()) for key, value in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(error.body()).encode()})


def check_shape(body: bytes, max_values: int) -> None:
    """Refuse a body with more than ``max_values`` JSON values outside strings, without parsing it.

    Counts commas and opening brackets outside strings: a JSON text with n values has at least n - 1
    of them. Stops at the first value over the limit, so a hostile body costs as little as a good one.
    """
    values, position, size = 0, 0, len(body)
    while position < size:
        found = _STRUCTURE.search(body, position, min(position + SLICE, size))
        if found is None:
            position = min(position + SLICE, size)
            continue
        if found.group() == b'"':
            position = _string_end(body, found.end())
            continue
        values += 1
        if values > max_values:
            raise invalid(f"the request body holds more than {max_values} JSON values; a request carries at most "
                          "the inputs this server accepts per request", param=None)  # fmt: skip
        position = found.end()


def _string_end(body: bytes, position: int) -> int:
    """Where the string whose content starts at ``position`` ends (after its closing quote; the body's end
    if it has none), a slice at a time: an escape cut by a slice's end makes the match stop before its
    backslash, and the next slice starts there."""
    size = len(body)
    while position < size:
        stop = min(position + SLICE, size)
        end = _IN_STRING.match(body, position, stop).end()  # type: ignore[union-attr]
        if end < stop and body[end] == 0x22:  # the closing quote
            return end + 1
        if end == position:  # a lone backslash at the body's very end
            return size
        position = end
    return size


def parse_json(body: bytes) -> Any:
    """The JSON value of ``body``; a 400 for anything that is not valid JSON (numbers too long included)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, non-UTF-8, over-long integers
        raise invalid(f"the request body is not valid JSON ({_reason(error)})", param=None) from None


def _reason(error: Exception) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at line {error.lineno} column {error.colno}"
    if isinstance(error, UnicodeDecodeError):
        return "it is not UTF-8"
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error).split(";")[0].split(":")[0]
