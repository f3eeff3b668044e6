"""Replicas with Ray Serve: two CPU replicas of the same app, each with its own engine, same results."""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest

from rge.serving import ServerSettings

from ..conftest import BUDGET, MAX_PIXELS, MIN_PIXELS
from ..live_server import free_port
from ..processes import call_bounded, start, stop
from ..test_candidates import cosine
from .conftest import MODEL

pytestmark = pytest.mark.slow
RAY_TIMEOUT = 300.0
"""Seconds two replicas have to start and load the tiny model (Ray itself starts first)."""


def test_two_replicas_serve_the_same_results(tiny_path, encoder):
    import ray
    from ray import serve

    from rge.serving.ray_serve import rge_deployment

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)

    def replicas() -> str:
        """The replicas' states, as Ray Serve reports them (which one is stuck, starting or failing)."""
        try:
            application = serve.status().applications.get("rge")
            return str(application.deployments["rge"] if application else "no application yet")
        except Exception as error:  # the status itself failed: say so
            return f"status unavailable ({error!r})"

    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        load = {"device": "cpu", "max_new_tokens": BUDGET, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
        application = rge_deployment(ServerSettings(model_names=(MODEL,)), str(tiny_path), load, replicas=2)
        call_bounded(lambda: serve.run(application, name="rge", route_prefix="/"), RAY_TIMEOUT,
                     lambda: f"serve.run never saw both replicas running: {replicas()}")  # fmt: skip
        status = serve.status().applications["rge"].deployments["rge"]
        assert status.replica_states.get("RUNNING") == 2
        url = f"http://127.0.0.1:{port}"
        texts = [f"question {n}: what is shown?" for n in range(8)]
        for text in texts:
            deadline = time.monotonic() + RAY_TIMEOUT
            while True:  # each replica answers 503 until its model is loaded
                response = httpx.post(f"{url}/v1/embeddings", json={"input": text, "input_type": "query"}, timeout=60)
                if response.status_code != 503:
                    break
                assert time.monotonic() < deadline, f"a replica still loading after {RAY_TIMEOUT:g} s: {replicas()}"
                time.sleep(0.2)
            assert response.status_code == 200, response.text
            assert cosine(encoder.encode_query(text), response.json()["data"][0]["embedding"]) >= 0.9999
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_command_runs_replicas_until_ctrl_c(tiny_path, encoder, tmp_path):
    import os
    import sys

    port = free_port()
    command = [sys.executable, "-m", "rge.cli", "serve", "--ray", "--replicas", "2", "--model", str(tiny_path),
               "--port", str(port), "--max-new-tokens", str(BUDGET), "--min-pixels", str(MIN_PIXELS),
               "--max-pixels", str(MAX_PIXELS), "--device", "cpu"]  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        process = start(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=sink)
    try:
        deadline = time.monotonic() + RAY_TIMEOUT
        while True:
            try:
                response = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": "a cat"}, timeout=30)
                if response.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            ended = process.poll()
            assert ended is None, f"rge serve --ray ended with {ended}:\n{log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, (
                f"rge serve --ray not answering within {RAY_TIMEOUT:g} s:\n" + (log.read_text()[-2000:])
            )
            time.sleep(0.5)
        assert cosine(encoder.encode_document("a cat"), response.json()["data"][0]["embedding"]) >= 0.9999
    finally:
        stop(process, timeout=60)  # Ctrl-C: killed with its Ray processes, and the test failed, if it does not end
    assert process.returncode == 0, log.read_text()[-2000:]
