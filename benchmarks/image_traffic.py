"""The image-heavy workload of ``serve.py``: ``rge serve`` processes under query traffic where half the
queries carry a 1-12 MP photo, with a probe client sending one small document request after another.

Each server is a real ``rge serve`` process (the client's work never shares its interpreter); with
``--baseline-ref REF`` the same command is also run from a git worktree of REF, so one run measures the
code before and after a change under the same load. Reported per server: requests/s and p50/p99 of the
heavy clients, and p50/p99/max of the probe (what one heavy request costs everybody else).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MEGAPIXELS = (1, 2, 4, 6, 9, 12)


def photo(megapixels: float, seed: int) -> str:
    """A smooth synthetic 4:3 photo as base64 JPEG (it compresses like a real one, unlike noise)."""
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(width * 3 / 4)
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
    image = Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def requests(texts: list[str], count: int) -> list[dict]:
    """``count`` query bodies; every other one carries a photo of 1 to 12 megapixels."""
    photos = [photo(mp, seed) for seed, mp in enumerate(MEGAPIXELS)]
    bodies = []
    for index in range(count):
        item: object = texts[index % len(texts)]
        if index % 2 == 0:
            item = {"text": texts[index % len(texts)], "image": photos[(index // 2) % len(photos)]}
        bodies.append({"input": [item], "input_type": "query"})
    return bodies


@contextmanager
def worktree(ref: str) -> Iterator[Path]:
    """A detached checkout of ``ref`` of this repository, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="rge-baseline-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder / "tree"), ref], check=True,
                   capture_output=True)  # fmt: skip
    try:
        yield folder / "tree"
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder / "tree")],
                       capture_output=True)  # fmt: skip


@contextmanager
def server(code: Path, model: str, args: list[str], log: Path) -> Iterator[str]:
    """``rge serve`` run from the source tree ``code`` on a free port; yields its URL once healthy."""
    sys.path.insert(0, str(ROOT))
    from tests.live_server import free_port, wait_until_healthy

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "rge.cli", "serve", "--model", model, "--port", str(port), *args]
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=code, env=env, stdout=sink, stderr=sink)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, lambda: process.poll() is None, 300)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(120)


async def load(url: str, bodies: list[dict], clients: int) -> dict:
    """Closed-loop ``clients`` sending ``bodies`` while a probe sends small documents; the measurements."""
    pending = list(enumerate(bodies))[::-1]
    latencies: list[float] = []
    probe: list[float] = []
    vectors: list = [None] * len(bodies)
    done = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:

        async def client() -> None:
            while pending:
                index, body = pending.pop()
                started = time.perf_counter()
                response = await http.post("/v1/embeddings", json=body)
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)
                vectors[index] = response.json()["data"][0]["embedding"]

        async def prober() -> None:
            while not done.is_set():
                started = time.perf_counter()
                (await http.post("/v1/embeddings", json={"input": "a small document"})).raise_for_status()
                probe.append(time.perf_counter() - started)
                await asyncio.sleep(0.05)

        probing = asyncio.ensure_future(prober())
        await asyncio.sleep(1.0)
        idle = list(probe)
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - started
        done.set()
        await probing
    loaded = probe[len(idle) :]
    return {
        "requests_per_s": len(bodies) / wall,
        "p50_s": float(np.percentile(latencies, 50)),
        "p99_s": float(np.percentile(latencies, 99)),
        "probe_idle_p50_s": float(np.percentile(idle, 50)),
        "probe_p50_s": float(np.percentile(loaded, 50)),
        "probe_p99_s": float(np.percentile(loaded, 99)),
        "probe_max_s": float(max(loaded)),
        "probe_requests": len(loaded),
        "vectors": vectors,
    }


def run(model: str, texts: list[str], args: argparse.Namespace) -> dict:
    """The image workload against the current code and, with ``args.baseline_ref``, against that ref."""
    bodies = requests(texts, args.requests)
    serve_args = ["--device", args.device, "--max-new-tokens", str(args.budget), "--batch-size", str(args.batch_size),
                  "--max-queued-items", "4096"]  # fmt: skip
    results: dict[str, dict] = {}
    baseline = worktree(args.baseline_ref) if args.baseline_ref else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as logs, baseline as before:
        trees = {f"before ({args.baseline_ref})": before} if before is not None else {}
        for name, code in {**trees, "after": ROOT}.items():
            with server(code, model, serve_args, Path(logs) / f"{len(results)}.log") as url:
                asyncio.run(load(url, bodies[: args.clients], args.clients))  # warm-up
                results[name] = asyncio.run(load(url, bodies, args.clients))
    vectors = [result.pop("vectors") for result in results.values()]
    agreement = min(float(np.dot(a, b)) for a, b in zip(vectors[0], vectors[-1]))
    return {"results": results, "min_cosine_between_servers": agreement}


def table(report: dict) -> str:
    lines = ["| server | requests/s | p50 | p99 | probe idle p50 | probe p50 | probe p99 | probe max |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, row in report["results"].items():
        cells = [row[key] * 1000 for key in ("p50_s", "p99_s", "probe_idle_p50_s", "probe_p50_s", "probe_p99_s",
                                             "probe_max_s")]  # fmt: skip
        lines.append(f"| {name} | {row['requests_per_s']:.2f} | " + " | ".join(f"{c:.0f} ms" for c in cells) + " |")
    return "\n".join(lines)
