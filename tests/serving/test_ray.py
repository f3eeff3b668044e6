"""Replicas with Ray Serve: two CPU replicas of the same app, each with its own engine, same results."""

from __future__ import annotations

import httpx
import pytest

from rge.serving import ServerSettings

from ..conftest import BUDGET, MAX_PIXELS, MIN_PIXELS
from ..live_server import free_port
from ..test_candidates import cosine
from .conftest import MODEL

pytestmark = pytest.mark.slow


def test_two_replicas_serve_the_same_results(tiny_path, encoder):
    import ray
    from ray import serve

    from rge.serving.ray_serve import rge_deployment

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        load = {"device": "cpu", "max_new_tokens": BUDGET, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
        serve.run(rge_deployment(ServerSettings(model_names=(MODEL,)), str(tiny_path), load, replicas=2),
                  name="rge", route_prefix="/")  # fmt: skip
        status = serve.status().applications["rge"].deployments["rge"]
        assert status.replica_states.get("RUNNING") == 2
        url = f"http://127.0.0.1:{port}"
        texts = [f"question {n}: what is shown?" for n in range(8)]
        for text in texts:
            for _ in range(100):  # each replica answers 503 until its model is loaded
                response = httpx.post(f"{url}/v1/embeddings", json={"input": text, "input_type": "query"}, timeout=60)
                if response.status_code != 503:
                    break
            assert response.status_code == 200, response.text
            assert cosine(encoder.encode_query(text), response.json()["data"][0]["embedding"]) >= 0.9999
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_command_runs_replicas_until_ctrl_c(tiny_path, encoder):
    import os
    import signal
    import subprocess
    import sys
    import time

    port = free_port()
    command = [sys.executable, "-m", "rge.cli", "serve", "--ray", "--replicas", "2", "--model", str(tiny_path),
               "--port", str(port), "--max-new-tokens", str(BUDGET), "--min-pixels", str(MIN_PIXELS),
               "--max-pixels", str(MAX_PIXELS), "--device", "cpu"]  # fmt: skip
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                response = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": "a cat"}, timeout=30)
                if response.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        assert cosine(encoder.encode_document("a cat"), response.json()["data"][0]["embedding"]) >= 0.9999
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-2000:]
