from __future__ import annotations

import socket
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stores run in this process and offline: any network connection attempt (telemetry, a model download)
    fails; local sockets (multiprocessing's, between a process pool's workers) work."""

    def guarded(connect: Any) -> Any:
        def refuse(sock: socket.socket, *args: object, **kwargs: object) -> Any:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                raise OSError(f"network access in a test: {args}")
            return connect(sock, *args, **kwargs)

        return refuse

    monkeypatch.setattr(socket.socket, "connect", guarded(socket.socket.connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(socket.socket.connect_ex))
