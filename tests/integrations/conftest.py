from __future__ import annotations

import socket

import pytest

from rge.testing import make_test_image


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for seed in (1, 2):
        path = folder / f"img{seed}.png"
        make_test_image(60 + 10 * seed, 50, seed=seed).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stores run in this process and offline: any connection attempt (telemetry, a model download) fails."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(f"network access in a test: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
