"""A real server (uvicorn on a free 127.0.0.1 port) over the tiny test checkpoint, and tools to drive it."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from PIL import Image

from rge.serving import ServerSettings, create_app

from ..live_server import live_server

MODEL = "rge-tiny"


@contextmanager
def running_server(encoder: Any, **settings: Any) -> Iterator[tuple[str, Any]]:
    """(base URL, the app's state) of a server with these settings over ``encoder`` (torch keeps the threads
    it has: the test session's other tests share this process)."""
    settings.setdefault("torch_threads", torch.get_num_threads())
    app = create_app(ServerSettings(model_names=(MODEL,), **settings), lambda: encoder)
    with live_server(app) as url:
        yield url, app.state.rge


@pytest.fixture(scope="module")
def server(encoder) -> Iterator[tuple[str, Any]]:
    with running_server(encoder, batch_size=8) as running:
        yield running


@pytest.fixture
def slow_steps(encoder, monkeypatch) -> Callable[[float], list[int]]:
    """Make each forward pass of the model sleep; returns the list that counts decode steps (1 row-token)."""

    def slow(seconds: float) -> list[int]:
        steps: list[int] = []
        inner = encoder.model.model
        original = inner.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            if kwargs["input_ids"].shape[1] == 1:
                steps.append(kwargs["input_ids"].shape[0])
            time.sleep(seconds)
            return original(*args, **kwargs)

        monkeypatch.setattr(inner, "forward", forward)
        return steps

    return slow


STEP_WAIT = 30.0
"""Seconds a held decode step waits for its event before going on (the test then fails, naming the wait)."""

Hold = Callable[[int, list[int]], tuple[threading.Event, str] | None]


@dataclass
class HeldSteps:
    """The rows of each decode step the model ran, in order, and the waits that ran out."""

    rows: list[int] = field(default_factory=list)
    stalled: list[str] = field(default_factory=list)


@pytest.fixture
def held_steps(encoder, monkeypatch) -> Callable[[Hold], HeldSteps]:
    """``held_steps(hold)``: before each decode step (one token per row), ``hold(rows, earlier)`` (this step's
    rows, the rows of the steps before) may return ``(event, what)``: the step waits for ``event``,
    ``STEP_WAIT`` seconds at most. A wait that runs out is recorded as ``what`` in ``stalled`` (once: later
    steps that would wait for the same go on). Tests order the engine's steps and their requests this way,
    not with sleeps."""

    def install(hold: Hold) -> HeldSteps:
        held = HeldSteps()
        inner = encoder.model.model
        original = inner.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            ids = kwargs.get("input_ids")
            if ids is not None and ids.shape[1] == 1:
                wait = hold(ids.shape[0], list(held.rows))
                if wait is not None and wait[1] not in held.stalled and not wait[0].wait(STEP_WAIT):
                    held.stalled.append(wait[1])
                held.rows.append(ids.shape[0])
            return original(*args, **kwargs)

        monkeypatch.setattr(inner, "forward", forward)
        return held

    return install


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def wait_until(condition: Callable[[], bool], timeout: float = 20.0, what: str = "the condition") -> None:
    """Poll ``condition`` until it holds; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout:g} s")
        time.sleep(0.01)


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``target`` in a thread; the dict gets its "result" or "error" and "finished" (monotonic time)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = target()
        except Exception as error:  # the test inspects it
            outcome["error"] = error
        outcome["finished"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome
