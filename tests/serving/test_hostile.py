"""``rge serve`` under hostile traffic, as an operator tries it: a real process on loopback, one client sending
a small request after another (the probe), and another client sending what a server must survive.

Bounds are relative to what the same test measures, so that a slow or loaded machine scales both sides:
the probe's worst latency while a heavy request runs is compared with its own idle latency and with the
heavy request's duration (a probe that had to wait for the heavy work would take about as long as it);
a refusal that must come early is compared with the work it avoids, timed in this process.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image

from ..conftest import BUDGET, MAX_PIXELS, MIN_PIXELS
from ..live_server import free_port, wait_until_healthy
from ..processes import start, stop
from .test_command import serve_command

LIMITS = ("--header-timeout", "1", "--body-timeout", "2", "--image-fetch-timeout", "1", "--shutdown-timeout", "2")


@contextmanager
def serve_process(tiny_path: Path, log: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """``rge serve`` over the tiny checkpoint on a free 127.0.0.1 port, its log in ``log``."""
    port = free_port()
    command = serve_command("--model", str(tiny_path), "--port", str(port), "--device", "cpu", "--max-new-tokens",
                            str(BUDGET), "--min-pixels", str(MIN_PIXELS), "--max-pixels", str(MAX_PIXELS),
                            "--served-model-name", "tiny", *args)  # fmt: skip
    with log.open("w") as sink:
        process = start(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=sink, stderr=sink)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, lambda: process.poll() is None, 120)
        yield url, process
    finally:
        stop(process, timeout=60)  # Ctrl-C; killed, and the test failed, if it does not end


@pytest.fixture(scope="module")
def hostile_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile") / "serve.log"


@pytest.fixture(scope="module")
def hostile(tiny_path, hostile_log) -> Iterator[str]:
    with serve_process(tiny_path, hostile_log, *LIMITS, "--allow-image-host", "127.0.0.1",
                       "--allow-private-image-hosts", "--max-queued-items", "200") as (url, _):  # fmt: skip
        yield url


class Probe:
    """Sends a small document request, then ``GET /health``, again and again (a short pause between), and
    records each round trip's seconds, marked with when it ended."""

    def __init__(self, url: str) -> None:
        self.url, self.rounds = url, []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                answer = client.post(f"{self.url}/v1/embeddings", json={"input": "a small document"})
                health = client.get(f"{self.url}/health")
                assert answer.status_code == 200 and health.status_code == 200, answer.text
                self.rounds.append((time.monotonic() - started, time.monotonic()))
                time.sleep(0.02)

    def idle(self, count: int = 10) -> list[float]:
        """Start, and return the first ``count`` round trips (nothing else running)."""
        self._thread.start()
        while len(self.rounds) < count:
            time.sleep(0.01)
        return [seconds for seconds, _ in self.rounds[:count]]

    def during(self, started: float, ended: float) -> list[float]:
        """Round trips that overlapped ``[started, ended]``, after waiting for the one running at ``ended``."""
        while not self.rounds or self.rounds[-1][1] <= ended:
            time.sleep(0.01)
        self._stop.set()
        self._thread.join(60)
        return [seconds for seconds, end in self.rounds if end >= started and end - seconds <= ended]


def timed_post(url: str, content: bytes) -> tuple[httpx.Response, float, float]:
    started = time.monotonic()
    response = httpx.post(f"{url}/v1/embeddings", content=content, headers={"content-type": "application/json"},
                          timeout=300)  # fmt: skip
    return response, started, time.monotonic()


def png_b64(size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def eight_megabyte_text() -> str:
    return ("The quick brown fox jumps over the lazy dog, again and again. " * 140_000)[:8_000_000]


def test_an_8mb_text_is_refused_without_tokenizing_it_and_stalls_nobody(hostile, encoder):
    text = eight_megabyte_text()
    probe = Probe(hostile)
    idle = probe.idle()
    response, started, ended = timed_post(hostile, json.dumps({"input": text}).encode())
    during = probe.during(started, ended)
    assert response.status_code == 400 and response.json()["error"]["param"] == "input[0]"
    assert "exceeds max_length" in response.json()["error"]["message"]
    tokenizing = time.monotonic()
    encoder.checkpoint.tokenizer([text], add_special_tokens=False)  # what the old server did before refusing
    tokenizing = time.monotonic() - tokenizing
    assert ended - started < tokenizing / 4
    assert max(during) < 10 * statistics.median(idle) + max(idle)


def test_a_body_of_millions_of_numbers_is_refused_before_parsing_and_health_answers(hostile):
    body = b'{"input": [' + b",".join([b"7"] * 8_000_000) + b"]}"
    parsing = time.monotonic()
    json.loads(body)  # what the old server did on its event loop
    parsing = time.monotonic() - parsing
    probe = Probe(hostile)
    idle = probe.idle()
    response, started, ended = timed_post(hostile, body)
    during = probe.during(started, ended)
    assert response.status_code == 400 and "JSON values" in response.json()["error"]["message"]
    assert ended - started < parsing / 2
    assert max(during) < 10 * statistics.median(idle) + max(idle)


def test_two_36_megapixel_images_do_not_stall_other_clients(hostile):
    big = png_b64((6000, 6000))
    body = json.dumps({"input": [{"text": "what is this?", "image": big}, {"image": big}], "input_type": "query"})
    probe = Probe(hostile)
    idle = probe.idle()
    response, started, ended = timed_post(hostile, body.encode())
    during = probe.during(started, ended)
    assert response.status_code == 200, response.text
    assert len(during) >= 3  # the probe kept going while the images were decoded and resized
    assert max(during) < (ended - started) / 3
    assert max(during) < 10 * statistics.median(idle) + max(idle)


@pytest.fixture(scope="module")
def slow_image_host() -> Iterator[str]:
    """A 127.0.0.1 HTTP server that sends its answer one byte every 0.2 s."""

    stop = threading.Event()

    def drip(connection: socket.socket) -> None:
        with connection:
            connection.settimeout(0.2)
            try:
                connection.recv(4096)
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"\0" * 1000:
                    if stop.is_set():
                        return
                    connection.sendall(bytes([byte]))
                    time.sleep(0.2)
            except OSError:
                return

    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:  # closed at the end of the module
                return
            threading.Thread(target=drip, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/slow.png"
    stop.set()
    server.close()


def test_a_slow_image_host_meets_the_fetch_deadline_and_never_delays_text(hostile, slow_image_host):
    body = json.dumps({"input": [{"text": "x", "image": slow_image_host}]}).encode()
    results: list[tuple[httpx.Response, float, float]] = []
    senders = [threading.Thread(target=lambda: results.append(timed_post(hostile, body))) for _ in range(24)]
    for sender in senders:
        sender.start()
    text, text_started, text_ended = timed_post(hostile, b'{"input": "plain text"}')
    for sender in senders:
        sender.join(120)
    assert text.status_code == 200
    assert len(results) == 24
    fetch_timeout = float(LIMITS[LIMITS.index("--image-fetch-timeout") + 1])
    for response, started, ended in results:
        assert response.status_code == 400 and response.json()["error"]["param"] == "input[0].image"
        assert "took longer than 1 s" in response.json()["error"]["message"]
        assert ended - started < 3 * fetch_timeout  # the deadline covers every byte, not each read
    assert text_ended - text_started < fetch_timeout  # a text request never waits for fetches


BAD = [
    ("nested 100,000 deep", b"[" * 100_000 + b"]" * 100_000, 400, None, "more than 1088 JSON values"),
    ("nested 1,000 deep", b'{"input": ' + b"[" * 1000 + b"]" * 1000 + b"}", 400, None, "nested too deeply"),
    ("a 5,000-digit integer", b'{"input": "a", "dimensions": ' + b"9" * 5000 + b"}", 400, None, "not valid JSON"),
    ("not UTF-8", b'{"input": "\xff\xfe"}', 400, None, "not valid JSON"),
    ("an unknown field", b'{"input": "a", "prompt_nam": "vqa"}', 400, "prompt_nam", 'unknown fields ["prompt_nam"]'),
    ("a broken IPv6 URL", b'{"input": [{"image": "http://[::1/x.png"}]}', 400, "input[0].image", "not valid"),
    ("port 99999", b'{"input": [{"image": "http://127.0.0.1:99999/x.png"}]}', 400, "input[0].image", "not valid"),
    ("port abc", b'{"input": ["ok", {"image": "http://127.0.0.1:abc/x.png"}]}', 400, "input[1].image", "not valid"),
    ("an unknown prompt", b'{"input": "a", "prompt_name": "poetry"}', 400, "prompt_name", "unknown prompt_name"),
    ("prompt and prompt_name", b'{"input": "a", "prompt": "x", "prompt_name": "vqa"}', 400, "prompt_name", "not both"),
    ("an image too wide to use", json.dumps({"input": [{"image": png_b64((6000, 20))}]}).encode(), 400,
     "input[0].image", "aspect ratio"),
    ("more items than the queue", json.dumps({"input": ["a"] * 256}).encode(), 413, None, "queues at most 200"),
    ("a lone surrogate quoted back", b'{"input": "a", "model": "\\ud800"}', 404, "model", "does not exist"),
    ("a lone surrogate in a prompt", b'{"input": "a", "prompt": "\\ud800"}', 400, "prompt", "not valid Unicode"),
    ("<emb> in a prompt", b'{"input": "a", "prompt": "x <emb>"}', 400, "prompt", "reserved token <emb>"),
    ("a huge prompt", json.dumps({"input": ["a"] * 200, "prompt": "p" * 30_000}).encode(), 400, "prompt",
     "at most 4096"),
    ("unterminated escapes", b'{"input": "' + b'\\"' * 1_000_000, 400, None, "not valid JSON"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "param", "message"), [case[1:] for case in BAD], ids=[c[0] for c in BAD])
def test_bad_bodies_get_openai_errors_naming_the_part(hostile, body, status, param, message):
    response, _, _ = timed_post(hostile, body)
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and message in error["message"], error
    assert not re.search(r"0x[0-9a-f]{6,}|object at|Traceback", error["message"])


def test_routes_answer_in_openai_shape_and_every_answer_is_counted(hostile):
    before = httpx.get(f"{hostile}/metrics").text
    missing = httpx.get(f"{hostile}/nowhere")
    wrong = httpx.get(f"{hostile}/v1/embeddings")
    slash = httpx.post(f"{hostile}/v1/embeddings/", json={"input": "a"}, headers={"host": "evil.example"})
    assert (missing.status_code, wrong.status_code, slash.status_code) == (404, 405, 404)
    assert "location" not in slash.headers  # no redirect built from the client's Host header
    for response in (missing, wrong, slash):
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert wrong.headers["allow"] == "POST"
    assert httpx.head(f"{hostile}/health").status_code == 200
    timed_post(hostile, b"{broken")
    after = httpx.get(f"{hostile}/metrics").text

    def count(text: str, route: str, status: str) -> float:
        key = f'rge_requests_total{{route="{route}",status="{status}"}}'
        lines = [line for line in text.splitlines() if line.startswith(key)]
        return float(lines[0].split()[-1]) if lines else 0.0

    assert count(after, "other", "404") - count(before, "other", "404") == 2  # no route, and the trailing slash
    assert count(after, "/v1/embeddings", "405") - count(before, "/v1/embeddings", "405") == 1
    assert count(after, "/v1/embeddings", "400") - count(before, "/v1/embeddings", "400") == 1


def test_slow_headers_and_slow_bodies_are_cut_off(hostile):
    host, port = hostile.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as silent:
        silent.settimeout(30)
        started = time.monotonic()
        silent.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        assert silent.recv(1024) == b""  # closed by the server
        assert time.monotonic() - started < 10  # within the 1 s header deadline, with room for a slow machine
    with socket.create_connection((host, int(port))) as slow:
        slow.settimeout(30)
        slow.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")  # fmt: skip
        answer = b""
        while b"}}" not in answer and (chunk := slow.recv(4096)):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408")
        assert b"did not arrive within 2 s" in answer


def test_a_client_leaving_mid_upload_is_one_log_line(hostile, hostile_log):
    host, port = hostile.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port))) as leaving:
            leaving.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 1000\r\n\r\n{\"input\": ")  # fmt: skip
            time.sleep(0.2)
    assert httpx.post(f"{hostile}/v1/embeddings", json={"input": "still here"}).status_code == 200
    log = hostile_log.read_text()
    assert log.count("a client left while sending its body") == 3
    assert "Traceback" not in log and "Exception in ASGI application" not in log


def test_sigterm_with_a_slow_upload_attached_answers_503_and_exits_cleanly(tiny_path, tmp_path):
    with serve_process(tiny_path, tmp_path / "serve.log", *LIMITS, "--body-timeout", "60") as (url, process):
        host, port = url.removeprefix("http://").split(":")
        slow = socket.create_connection((host, int(port)))
        slow.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")  # fmt: skip
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        answer = b""
        slow.settimeout(0.5)
        while process.poll() is None and time.monotonic() - signalled < 60:
            try:
                slow.sendall(b" ")  # one byte at a time, as slowly as a hostile client would
                answer += slow.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
        process.wait(60)
        stopped = time.monotonic() - signalled
        slow.close()
    assert process.returncode == 0, (tmp_path / "serve.log").read_text()[-2000:]
    assert answer.startswith(b"HTTP/1.1 503") and b"shutting down" in answer
    shutdown_timeout = float(LIMITS[LIMITS.index("--shutdown-timeout") + 1])
    assert shutdown_timeout <= stopped < 5 * shutdown_timeout + 10
