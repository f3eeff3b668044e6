"""The engine loop under concurrency: queries of many requests share the running batch, each request is
answered when its own items finish, and results equal each item encoded alone; disconnects, timeouts and
overload drop or refuse work without disturbing the rest."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import httpx
import openai
import pytest

from ..test_candidates import cosine
from .conftest import MODEL, b64, in_thread, png_bytes, running_server, wait_until

QUERY_TEXTS = [f"Question {n}: which {animal} is near the {place}?" for n, (animal, place) in enumerate(
    [(a, p) for a in ("cat", "dog", "tiger", "owl", "horse") for p in ("river", "door", "tree", "car")])]  # fmt: skip
TOPICS = ["printing", "rivers", "owls", "cars", "bread", "glass", "rain", "maps", "salt", "bees", "tea", "clocks"]
DOCUMENT_TEXTS = [f"Document {n} about {topic}." for n, topic in enumerate(TOPICS)]
IMAGES = [png_bytes((40 * n, 200 - 30 * n, 90), (48 + 16 * n, 40 + 8 * n)) for n in range(4)]


@pytest.fixture(scope="module")
def pool(encoder):
    """Every item the load test sends, with its single-item result: (input, input_type, vector, rationale)."""
    items = []
    for text in QUERY_TEXTS:
        vector, rationale = encoder.encode_query(text, return_rationales=True)
        items.append((text, "query", vector, rationale))
    for n, image in enumerate(IMAGES):
        vector, rationale = encoder.encode_query({"text": f"Describe picture {n}.", "image": image},
                                                 return_rationales=True)  # fmt: skip
        items.append(({"text": f"Describe picture {n}.", "image": b64(image)}, "query", vector, rationale))
        items.append(({"image": b64(image)}, "document", encoder.encode_document({"image": image}), ""))
    for text in DOCUMENT_TEXTS:
        items.append((text, "document", encoder.encode_document(text), ""))
    return items


def test_load_64_clients_every_item_equals_its_single_result(encoder, pool):
    rng = random.Random(7)
    requests = []
    for _ in range(320):
        side = rng.choice(["query", "document"])
        candidates = [entry for entry in pool if entry[1] == side]
        requests.append(rng.sample(candidates, rng.randint(1, 3)))
    with running_server(encoder, batch_size=16, batch_wait=0.002) as (url, state):

        async def drive() -> list:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
            pending = list(enumerate(requests))
            answers: list = [None] * len(requests)

            async def one_client() -> None:
                while pending:
                    index, entries = pending.pop()
                    answers[index] = await client.embeddings.create(
                        model=MODEL, input=[entry[0] for entry in entries],
                        extra_body={"input_type": entries[0][1], "return_rationales": True})  # fmt: skip

            await asyncio.gather(*(one_client() for _ in range(64)))
            return answers

        started = time.monotonic()
        answers = asyncio.run(drive())
        elapsed = time.monotonic() - started
        metrics = httpx.get(f"{url}/metrics").text
        assert state.scheduler.accepted == 0  # nothing left behind
    assert elapsed < 120
    checked = 0
    for entries, answer in zip(requests, answers):
        assert len(answer.data) == len(entries)
        for entry, data in zip(entries, answer.data):
            assert cosine(entry[2], data.embedding) >= 0.9999, entry[0]  # nothing lost or swapped
            if entry[1] == "query":
                assert data.model_extra["rationale"] == entry[3]
            checked += 1
    assert checked == sum(len(entries) for entries in requests) > 320
    # Queries of different requests shared decode steps: some steps fed more rows than any request has.
    shared = [line for line in metrics.splitlines() if line.startswith('rge_batch_size_bucket{kind="decode",le="4.0"}')]
    total = [line for line in metrics.splitlines() if line.startswith('rge_batch_size_count{kind="decode"}')]
    assert float(shared[0].split()[-1]) < float(total[0].split()[-1])


def test_a_query_arriving_mid_decode_joins_and_leaves_first(encoder, pool, slow_steps):
    lengths = {entry[0]: len(encoder.encode_query([entry[0]], return_rationales=True)[1].token_ids[0])
               for entry in pool if entry[1] == "query" and isinstance(entry[0], str)}  # fmt: skip
    long_text, short_text = max(lengths, key=lengths.get), min(lengths, key=lengths.get)
    assert lengths[long_text] >= lengths[short_text] + 10  # room for the newcomer to finish first
    steps = slow_steps(0.02)
    with running_server(encoder, batch_size=8) as (url, state):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(text):
            return lambda: client.embeddings.create(model=MODEL, input=[text], extra_body={"input_type": "query"})

        long_thread, long_outcome = in_thread(ask(long_text))
        wait_until(lambda: len(steps) >= 2)  # the long query is decoding
        short_thread, short_outcome = in_thread(ask(short_text))
        short_thread.join(60)
        long_thread.join(60)
    assert short_outcome["finished"] < long_outcome["finished"]  # answered when its own query finished
    assert 2 in steps  # the newcomer was admitted into the running batch
    assert cosine(encoder.encode_query(short_text), short_outcome["result"].data[0].embedding) >= 0.9999
    assert cosine(encoder.encode_query(long_text), long_outcome["result"].data[0].embedding) >= 0.9999


def test_a_client_that_disconnects_has_its_items_dropped(encoder, pool, slow_steps):
    text = max((entry[0] for entry in pool if entry[1] == "query" and isinstance(entry[0], str)),
               key=lambda t: len(encoder.encode_query([t], return_rationales=True)[1].token_ids[0]))  # fmt: skip
    steps = slow_steps(0.05)
    with running_server(encoder) as (url, state):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/embeddings", json={"input": [text, text], "input_type": "query"}, timeout=0.4)
        wait_until(lambda: state.scheduler.accepted == 0, timeout=5)
        stopped_at = len(steps)
        time.sleep(0.3)
        assert len(steps) == stopped_at < 20  # no more decode steps for the departed client
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "still serving"}, timeout=30).status_code == 200


def test_overload_gets_429_with_retry_after_then_recovers(encoder, pool, slow_steps):
    slow_steps(0.03)
    with running_server(encoder, max_queued_items=2) as (url, state):
        body = {"input": QUERY_TEXTS[:2], "input_type": "query"}
        first_thread, first = in_thread(lambda: httpx.post(f"{url}/v1/embeddings", json=body, timeout=60))
        wait_until(lambda: state.scheduler.accepted == 2)
        refused = httpx.post(f"{url}/v1/embeddings", json={"input": "one more"})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        first_thread.join(60)
        assert first["result"].status_code == 200
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "one more"}).status_code == 200


def test_request_timeout_answers_504_and_frees_the_batch(encoder, slow_steps):
    steps = slow_steps(0.05)
    with running_server(encoder, request_timeout=0.3) as (url, state):
        response = httpx.post(f"{url}/v1/embeddings", json={"input": QUERY_TEXTS[:3], "input_type": "query"},
                              timeout=30)  # fmt: skip
        assert response.status_code == 504 and response.json()["error"]["type"] == "timeout_error"
        wait_until(lambda: state.scheduler.accepted == 0, timeout=5)
        stopped_at = len(steps)
        time.sleep(0.3)
        assert len(steps) == stopped_at


def test_the_engine_thread_only_runs_the_model(encoder, monkeypatch):
    """Decoding, resizing, patching and tokenizing happen in the input workers, never on the engine thread
    nor on the event loop, for queries and documents alike."""
    from rge.images import VisionPreprocessor
    from rge.serving import preparation
    from rge.tokenization import PromptTokenizer

    threads: dict[str, set[str]] = {}

    def spy(owner, name):
        original = getattr(owner, name)

        def recorded(*args, **kwargs):
            threads.setdefault(name, set()).add(threading.current_thread().name.rsplit("_", 1)[0])
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, recorded)

    for owner, name in ((VisionPreprocessor, "prepare"), (VisionPreprocessor, "patches"), (preparation, "open_image"),
                        (PromptTokenizer, "__call__")):  # fmt: skip
        spy(owner, name)
    picture = b64(png_bytes((200, 40, 90), (120, 80)))
    with running_server(encoder, batch_size=4) as (url, _):
        bodies = [{"input": [{"text": f"photo {n}", "image": picture}] * 3, "input_type": side}
                  for n in range(4) for side in ("query", "document")] + [{"input": "text only"}]  # fmt: skip
        outcomes = [in_thread(lambda body=body: httpx.post(f"{url}/v1/embeddings", json=body, timeout=60))
                    for body in bodies]  # fmt: skip
        for thread, outcome in outcomes:
            thread.join(60)
            assert outcome["result"].status_code == 200
    assert threads == {"open_image": {"rge-images"}, "prepare": {"rge-images"}, "patches": {"rge-inputs"},
                       "__call__": {"rge-images", "rge-text"}}  # fmt: skip


def test_a_batch_of_image_documents_waits_for_its_patches_not_without_them(encoder):
    picture = b64(png_bytes((20, 140, 90), (160, 120)))
    with running_server(encoder, batch_size=8, batch_wait=0.0) as (url, _):
        body = {"input": [{"text": f"photo {n}", "image": picture} for n in range(8)]}
        assert httpx.post(f"{url}/v1/embeddings", json=body, timeout=60).status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
    counts = [line for line in metrics.splitlines() if line.startswith('rge_batch_size_count{kind="documents"}')]
    assert float(counts[0].split()[-1]) == 1  # one forward of 8, not several of what happened to be ready
