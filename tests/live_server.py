"""Runs an app under uvicorn on a free 127.0.0.1 port in a thread, for tests that speak real HTTP."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from rge.serving.server import make_server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_healthy(url: str, alive: Callable[[], bool], timeout: float) -> None:
    """Poll ``url``/health until it answers 200; RuntimeError if ``alive()`` turns False or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not alive():
            raise RuntimeError(f"the server at {url} did not become ready")
        time.sleep(0.05)


@contextmanager
def live_server(app: Any, *, ready_timeout: float = 60.0) -> Iterator[str]:
    """Yields the base URL once ``/health`` answers 200; stops the server afterwards. An rge app runs under
    ``rge serve``'s server (header deadline, bounded shutdown), any other app under plain uvicorn."""
    port = free_port()
    if hasattr(app.state, "rge"):
        server: uvicorn.Server = make_server(app, host="127.0.0.1", port=port, log_level="warning")
    else:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, thread.is_alive, ready_timeout)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
