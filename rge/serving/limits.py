"""The request body limit, enforced on the declared length and on the bytes actually received."""

from __future__ import annotations

import json
from typing import Any


class BodyTooLarge(Exception):
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
            await _refuse(send, f"the request body is {int(declared)} bytes; this server accepts at most {self.limit}")
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


async def _refuse(send: Any, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}})
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body.encode()})
