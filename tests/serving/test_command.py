"""``rge serve`` as operators run it: a real process on loopback, stopped by Ctrl-C; one-line failures."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import httpx
import openai

from ..conftest import BUDGET
from ..live_server import free_port, wait_until_healthy
from ..processes import run_bounded, start, stop
from ..test_candidates import cosine


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "rge.cli", "serve", *args]


def test_serve_answers_the_openai_client_then_stops_on_ctrl_c(tiny_path, encoder):
    port = free_port()
    env = {**os.environ, "RGE_API_KEY": "k3y", "HF_HUB_OFFLINE": "1"}
    process = start(serve_command("--model", str(tiny_path), "--port", str(port), "--max-new-tokens", str(BUDGET),
                                  "--min-pixels", str(28 * 28 * 4), "--max-pixels", str(28 * 28 * 16),
                                  "--served-model-name", "tiny", "--query-model-suffix", ":query"),
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, lambda: process.poll() is None, 90)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0)
        got = client.embeddings.create(model="tiny", input="a cat", extra_body={"input_type": "query"})
        assert cosine(encoder.encode_query("a cat"), got.data[0].embedding) >= 0.9999
        by_name = client.embeddings.create(model="tiny:query", input="a cat")  # the query model name reasons
        assert cosine(encoder.encode_query("a cat"), by_name.data[0].embedding) >= 0.9999
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key from RGE_API_KEY applies
    finally:
        _, stderr = stop(process, timeout=30)  # Ctrl-C
    assert process.returncode == 0, stderr
    assert "rge: model loaded" in stderr and "Uvicorn running on http://127.0.0.1:" in stderr


def test_a_taken_port_is_refused_before_loading(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_bounded(serve_command("--model", str(tmp_path / "nowhere"), "--port", str(port)), timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().startswith(f"rge serve: cannot listen on 127.0.0.1:{port}")
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_model_that_cannot_load_ends_the_server_with_status_4(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    for model in (tmp_path / "missing", tmp_path / "broken"):
        done = run_bounded(serve_command("--model", str(model), "--port", str(free_port())), timeout=120, env=env)
        assert done.returncode == 4, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("rge serve: ") and str(model.name) in done.stderr
        said = [line for line in done.stderr.splitlines() if str(model.name) in line]
        assert "ERROR" not in done.stderr and said == [last], done.stderr  # said once, as the last line
