"""rge serve under concurrent query load, against a naive server that wraps ``encode`` one request at a time;
or (``--workload images``) rge serve under image-heavy traffic, before and after a change.

    python benchmarks/serve.py --clients 32 --requests 256
    python benchmarks/serve.py --model MCG-NJU/RGE --device cuda --clients 64 --requests 512
    python benchmarks/serve.py --workload images --clients 8 --requests 64 --baseline-ref 4b553f5

Both servers run the same encoder in this process (uvicorn on 127.0.0.1), and the same closed-loop
clients (each sends its next request when the previous one is answered) send one query per request,
taken from a pool of varied questions. The naive server is what one writes around ``encode``: a lock,
then ``encode_query`` of the request's items. rge's server shares one running decode batch among all
requests. Prints requests/s, p50/p99 latency and the ratios, and checks both return the same vectors.
Without ``--model`` a random checkpoint of ``rge.testing`` is built (its rationales stop at varied steps).
The image workload is described in ``image_traffic.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import image_traffic  # noqa: E402

from rge import RGEEncoder  # noqa: E402
from rge.serving import ServerSettings, create_app  # noqa: E402
from tests.live_server import live_server  # noqa: E402

SUBJECTS = ["cat", "dog", "tiger", "owl", "horse", "car", "bridge", "kitchen", "river", "mountain", "clock", "tree"]
ASKS = ["What is the {} doing?", "Where is the {} in the picture?", "Is the {} red or blue?",
        "How many {}s can be seen, and what surrounds them?", "Describe the {}."]  # fmt: skip


def naive_app(encoder: RGEEncoder) -> FastAPI:
    """One request at a time, each a call of ``encode_query``: the server a user writes around ``encode``."""
    app = FastAPI()
    lock = threading.Lock()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict:
        body = await request.json()

        def encode() -> np.ndarray:
            with lock:
                return encoder.encode_query(body["input"], batch_size=16)

        vectors = await run_in_threadpool(encode)
        return {"data": [{"index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]}

    return app


async def drive(url: str, texts: list[str], clients: int) -> tuple[float, list[float], list[list[float]]]:
    """Closed-loop clients; returns wall seconds, per-request latencies and the vectors by request."""
    pending = list(enumerate(texts))[::-1]
    latencies: list[float] = []
    vectors: list = [None] * len(texts)
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:

        async def client() -> None:
            while pending:
                index, text = pending.pop()
                start = time.perf_counter()
                response = await http.post("/v1/embeddings", json={"input": [text], "input_type": "query"})
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)
                vectors[index] = response.json()["data"][0]["embedding"]

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - start, latencies, vectors


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint (default: a random rge.testing checkpoint)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the built checkpoint")
    parser.add_argument("--layers", type=int, default=4, help="layers of the built checkpoint")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="rge serve's running batch")
    parser.add_argument("--budget", type=int, default=32, help="max_new_tokens")
    parser.add_argument("--output", help="write the numbers as JSON here")
    parser.add_argument("--workload", choices=("queries", "images"), default="queries",
                        help="images: half the queries carry a 1-12 MP photo, a probe sends small ones")  # fmt: skip
    parser.add_argument("--baseline-ref", help="images: also serve from this git ref, for a before/after table")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model is None:
            from rge.testing import build_tiny_checkpoint

            model = str(build_tiny_checkpoint(scratch, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                              intermediate_size=2 * args.hidden, emb_budget=args.budget))  # fmt: skip
        texts = [ask.format(subject) for subject in SUBJECTS for ask in ASKS]
        if args.workload == "images":
            return images_workload(model, texts, args)
        encoder = RGEEncoder.from_pretrained(model, device=args.device, max_new_tokens=args.budget)
    texts = [texts[i % len(texts)] for i in range(args.requests)]
    _, rationales = encoder.encode_query(texts[: len(SUBJECTS) * len(ASKS)], return_rationales=True)
    lengths = rationales.num_generated_tokens
    results = {}
    servers = {"naive": naive_app(encoder),
               "rge": create_app(ServerSettings(batch_size=args.batch_size, torch_threads=torch.get_num_threads()),
                                 lambda: encoder)}  # both servers run the model with the same threads  # fmt: skip
    vectors = {}
    for name, app in servers.items():
        with live_server(app) as url:
            asyncio.run(drive(url, texts[: args.clients], args.clients))  # warm-up
            wall, latencies, vectors[name] = asyncio.run(drive(url, texts, args.clients))
        results[name] = {"requests_per_s": len(texts) / wall, "p50_s": percentile(latencies, 50),
                         "p99_s": percentile(latencies, 99), "wall_s": wall}  # fmt: skip
    agreement = min(float(np.dot(a, b)) for a, b in zip(vectors["naive"], vectors["rge"]))
    report = {
        "model": args.model or f"rge.testing hidden={args.hidden} layers={args.layers}",
        "device": args.device, "clients": args.clients, "requests": len(texts), "batch_size": args.batch_size,
        "budget": args.budget, "rationale_tokens_mean": statistics.mean(lengths), "min_cosine_rge_vs_naive": agreement,
        "results": results,
        "throughput_ratio": results["rge"]["requests_per_s"] / results["naive"]["requests_per_s"],
        "p50_ratio": results["naive"]["p50_s"] / results["rge"]["p50_s"],
        "p99_ratio": results["naive"]["p99_s"] / results["rge"]["p99_s"],
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    print("\n| server | requests/s | p50 latency | p99 latency |\n|---|---:|---:|---:|")
    for name, row in results.items():
        print(f"| {name} | {row['requests_per_s']:.1f} | {row['p50_s'] * 1000:.0f} ms | {row['p99_s'] * 1000:.0f} ms |")
    print(f"\nrge / naive: {report['throughput_ratio']:.1f}x requests/s, p50 {report['p50_ratio']:.1f}x lower, "
          f"p99 {report['p99_ratio']:.1f}x lower; vectors agree (min cosine {agreement:.6f})")  # fmt: skip
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


def images_workload(model: str, texts: list[str], args: argparse.Namespace) -> None:
    report = {"model": args.model or f"rge.testing hidden={args.hidden} layers={args.layers}", "device": args.device,
              "clients": args.clients, "requests": args.requests, "batch_size": args.batch_size, "budget": args.budget,
              **image_traffic.run(model, texts, args)}  # fmt: skip
    print(json.dumps(report, indent=2))
    print("\n" + image_traffic.table(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
