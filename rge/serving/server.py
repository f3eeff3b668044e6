"""Running the app under uvicorn with the limits uvicorn lacks: a deadline for a request's headers, and a
shutdown that ends within ``shutdown_timeout`` whatever clients do.

On SIGTERM or Ctrl-C the server stops listening, answers 503 to new requests on open connections, and
gives requests in flight ``shutdown_timeout`` seconds; those still waiting then (for the engine, or for
their own body) get 503 and the process exits.
"""

from __future__ import annotations

import asyncio
import copy
import socket
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from .settings import ServerSettings


class _HeaderDeadline:
    """Mixed into uvicorn's HTTP protocol: a connection whose request headers take longer than
    ``header_timeout`` seconds (from connecting, or from the first byte of a later request) is closed."""

    header_timeout: float
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(self.header_timeout, self._late)

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self._awaiting_headers():
            self._header_timer = self.loop.call_later(self.header_timeout, self._late)
        super().data_received(data)  # type: ignore[misc]
        if self._header_timer is not None and not self._awaiting_headers():
            self._header_timer.cancel()
            self._header_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)  # type: ignore[misc]

    def _awaiting_headers(self) -> bool:
        """No request whose headers are complete is being answered."""
        return self.cycle is None or bool(self.cycle.response_complete)

    def _late(self) -> None:
        self._header_timer = None
        if self._awaiting_headers():
            self.transport.close()


def http_protocol(header_timeout: float) -> type:
    """uvicorn's HTTP protocol (httptools when installed, else h11) with the header deadline."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base  # type: ignore[assignment]
    return type("RGEHTTPProtocol", (_HeaderDeadline, base), {"header_timeout": header_timeout})


class RGEServer(uvicorn.Server):
    """A uvicorn server that tells the app when it starts shutting down (``ServerState.begin_shutdown``)."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_shutdown = on_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.on_shutdown()
        await super().shutdown(sockets)


def make_server(app: Any, *, host: str, port: int, log_level: str = "info") -> RGEServer:
    """A server for ``app`` (from ``create_app``) on ``host:port``, with its settings' header and shutdown limits."""
    settings: ServerSettings = app.state.rge.settings
    logging = copy.deepcopy(LOGGING_CONFIG)  # rge's own lines (ready, a client gone, a failure) as uvicorn's
    logging["loggers"]["rge"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        log_config=logging,
        lifespan="on",
        http=http_protocol(settings.header_timeout),
        timeout_graceful_shutdown=int(settings.shutdown_timeout) + 5,  # a backstop: the app answers 503 before
    )
    return RGEServer(config, app.state.rge.begin_shutdown)
