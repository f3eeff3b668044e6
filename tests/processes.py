"""Child processes, and calls that wait on other processes, with a bound: a test that would hang fails instead,
naming what was stuck and showing the end of what it wrote. A child runs in a session of its own, so that
ending it ends what it started too (the engine's workers, Ray's processes, the pytest a script runs)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
TAIL = 3000
"""Characters of a stuck process's output shown in the failure."""


def run_bounded(command: Sequence[str], timeout: float, *, check: bool = False,
                **options: Any) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``subprocess.run(command, capture_output=True, text=True, **options)``, failing the test when ``command``
    has not finished after ``timeout`` seconds (it and its children are killed), or with ``check`` when it
    exits with another status than 0."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **options) as process:  # fmt: skip
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(process)
            stdout, stderr = process.communicate()
            pytest.fail(f"{shown(command)} did not finish within {timeout:g} s (killed); it wrote:\n"
                        f"{tail(stdout, stderr)}", pytrace=False)  # fmt: skip
    if check and process.returncode != 0:
        pytest.fail(f"{shown(command)} exited with {process.returncode}; it wrote:\n{tail(stdout, stderr)}",
                    pytrace=False)  # fmt: skip
    return subprocess.CompletedProcess(list(command), process.returncode, stdout, stderr)


def start(command: Sequence[str], **options: Any) -> subprocess.Popen:
    """``subprocess.Popen`` in a session of its own (``stop`` ends it, with whatever it started)."""
    return subprocess.Popen(command, start_new_session=True, **options)


def stop(process: subprocess.Popen, timeout: float, *, sign: signal.Signals = signal.SIGINT) -> tuple[Any, Any]:
    """Send ``sign`` (Ctrl-C by default) and wait for ``process`` to end; its (stdout, stderr) if piped. After
    ``timeout`` seconds it and its children are killed and the test fails, naming it."""
    if process.poll() is None:
        process.send_signal(sign)
    try:
        return process.communicate(timeout=timeout)  # type: ignore[no-any-return]
    except subprocess.TimeoutExpired:
        kill_session(process)
        stdout, stderr = process.communicate()
        pytest.fail(f"{shown(process.args)} did not end within {timeout:g} s of {sign.name} (killed); it wrote:\n"
                    f"{tail(stdout, stderr)}", pytrace=False)  # fmt: skip


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL ``process`` and every process of its session (started by ``run_bounded`` or ``start``)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # (gone already)
        pass


def call_bounded(call: Callable[[], T], timeout: float, what: Callable[[], str]) -> T:
    """``call()`` in a daemon thread, its result or its exception; after ``timeout`` seconds the test fails with
    ``what()`` (say which process is stuck). The thread is left behind: it cannot be stopped, only not waited for."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as error:  # handed to the caller's thread below
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"no result within {timeout:g} s: {what()}", pytrace=False)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]  # type: ignore[no-any-return]


def shown(command: Any) -> str:
    return shlex.join(str(part) for part in command) if isinstance(command, (list, tuple)) else str(command)


def tail(*outputs: str | bytes | None) -> str:
    text = "\n".join(out.decode(errors="replace") if isinstance(out, bytes) else out for out in outputs if out)
    return text[-TAIL:] or "(nothing)"
