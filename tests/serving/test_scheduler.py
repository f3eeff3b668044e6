"""The engine loop under concurrency: queries of many requests share the running batch, each request is
answered when its own items finish, and results equal each item encoded alone; disconnects, timeouts and
overload drop or refuse work without disturbing the rest."""

from __future__ import annotations

import asyncio
import random
import threading

import httpx
import openai
import pytest

from ..test_candidates import cosine
from .conftest import MODEL, b64, in_thread, png_bytes, running_server, wait_until

QUERY_TEXTS = [f"Question {n}: which {animal} is near the {place}?" for n, (animal, place) in enumerate(
    [(a, p) for a in ("cat", "dog", "tiger", "owl", "horse") for p in ("river", "door", "tree", "car")])]  # fmt: skip
TOPICS = ["printing", "rivers", "owls", "cars", "bread", "glass", "rain", "maps", "salt", "bees", "tea", "clocks"]
DOCUMENT_TEXTS = [f"Document {n} about {topic}." for n, topic in enumerate(TOPICS)]
LOAD_TIMEOUT = 600.0
"""Seconds the load test's requests have to be answered, all together: far more than they take."""
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

        try:
            answers = asyncio.run(asyncio.wait_for(drive(), timeout=LOAD_TIMEOUT))
        except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11)
            pytest.fail(f"the {len(requests)} requests were not all answered within {LOAD_TIMEOUT:g} s")
        metrics = httpx.get(f"{url}/metrics").text
        assert state.scheduler.accepted == 0  # nothing left behind
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


def query_lengths(encoder, pool) -> dict[str, int]:
    """Tokens each text query of the pool generates alone (its decode steps)."""
    return {entry[0]: len(encoder.encode_query([entry[0]], return_rationales=True)[1].token_ids[0])
            for entry in pool if entry[1] == "query" and isinstance(entry[0], str)}  # fmt: skip


def signal_calls(monkeypatch, name: str, count: int = 1) -> threading.Event:
    """An event set once ``Scheduler.<name>`` has returned ``count`` times (``submit``: a job reached the
    engine's inbox; ``cancel``: the server dropped a job)."""
    from rge.serving.scheduler import Scheduler

    event, calls, original = threading.Event(), [], getattr(Scheduler, name)

    def called(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) >= count:
            event.set()
        return result

    monkeypatch.setattr(Scheduler, name, called)
    return event


def generated_tokens(url: str) -> float:
    """``rge_generated_tokens_total``: tokens of the queries that finished."""
    lines = [line for line in httpx.get(f"{url}/metrics").text.splitlines()
             if line.startswith("rge_generated_tokens_total")]  # fmt: skip
    return float(lines[0].split()[-1])


def test_a_query_arriving_mid_decode_joins_and_leaves_first(encoder, pool, held_steps, monkeypatch):
    """The long query's third step waits until the short request has reached the engine, so the short query
    joins the running batch with at least ten fewer tokens to go; once it has left, the long query's steps
    wait for the short request's answer: it is answered while the long query still decodes."""
    lengths = query_lengths(encoder, pool)
    long_text, short_text = max(lengths, key=lengths.get), min(lengths, key=lengths.get)
    assert lengths[long_text] >= lengths[short_text] + 10  # room for the newcomer to finish first
    submitted, short_answered = signal_calls(monkeypatch, "submit", count=2), threading.Event()

    def hold(rows, earlier):
        if len(earlier) == 2:
            return submitted, "the short request never reached the engine"
        if rows == 1 and 2 in earlier:
            return short_answered, "the short request was not answered while the long query decoded"
        return None

    held = held_steps(hold)
    with running_server(encoder, batch_size=8) as (url, state):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(text, answered=None):
            def run():
                try:
                    return client.embeddings.create(model=MODEL, input=[text], extra_body={"input_type": "query"})
                finally:
                    if answered is not None:
                        answered.set()

            return run

        long_thread, long_outcome = in_thread(ask(long_text))
        wait_until(lambda: len(held.rows) >= 2, what="the long query decoding")
        short_thread, short_outcome = in_thread(ask(short_text, short_answered))
        short_thread.join(120)
        long_thread.join(120)
    assert not held.stalled, held.stalled
    assert 2 in held.rows and held.rows[-1] == 1  # the newcomer joined the running batch, and left it first
    assert cosine(encoder.encode_query(short_text), short_outcome["result"].data[0].embedding) >= 0.9999
    assert cosine(encoder.encode_query(long_text), long_outcome["result"].data[0].embedding) >= 0.9999


def assert_only_new_work_decodes(encoder, url: str, held, text: str) -> None:
    """After a job was dropped: a new query's steps are the only ones (one row each, as many as its tokens),
    and only its tokens count as generated (the dropped queries never finished)."""
    tokens = len(encoder.encode_query([text], return_rationales=True)[1].token_ids[0])
    dropped_steps = len(held.rows)  # (after the encode above: its steps are counted too)
    response = httpx.post(f"{url}/v1/embeddings", json={"input": text, "input_type": "query"}, timeout=60)
    assert response.status_code == 200
    assert held.rows[dropped_steps:] == [1] * tokens
    assert generated_tokens(url) == tokens


def test_a_client_that_disconnects_has_its_items_dropped(encoder, pool, held_steps, monkeypatch):
    """Decoding waits until the server has dropped the job of the client that left (so the client cannot
    have been answered), then no step feeds its queries again."""
    lengths = query_lengths(encoder, pool)
    text = max(lengths, key=lengths.get)
    cancelled = signal_calls(monkeypatch, "cancel")
    held = held_steps(lambda rows, earlier: (cancelled, "the server never dropped the departed client's job"))
    with running_server(encoder) as (url, state):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/embeddings", json={"input": [text, text], "input_type": "query"}, timeout=1)
        wait_until(lambda: state.scheduler.accepted == 0, what="the departed client's items released")
        assert held.rows and set(held.rows) == {2} and len(held.rows) < lengths[text]  # left mid-decode
        assert_only_new_work_decodes(encoder, url, held, "still serving")
    assert not held.stalled, held.stalled


def test_overload_gets_429_with_retry_after_then_recovers(encoder, pool, held_steps):
    refused_seen = threading.Event()
    held = held_steps(lambda rows, earlier: (refused_seen, "the first request decoded before the refusal"))
    with running_server(encoder, max_queued_items=2) as (url, state):
        body = {"input": QUERY_TEXTS[:2], "input_type": "query"}
        first_thread, first = in_thread(lambda: httpx.post(f"{url}/v1/embeddings", json=body, timeout=60))
        try:
            wait_until(lambda: state.scheduler.accepted == 2, what="the first request's two items accepted")
            refused = httpx.post(f"{url}/v1/embeddings", json={"input": "one more"})
        finally:
            refused_seen.set()  # the first request decodes now
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        first_thread.join(120)
        assert first["result"].status_code == 200
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "one more"}).status_code == 200
    assert not held.stalled, held.stalled


def test_request_timeout_answers_504_and_frees_the_batch(encoder, held_steps, monkeypatch):
    """Decoding waits until the server has dropped the timed-out job, so the timeout always comes first."""
    cancelled = signal_calls(monkeypatch, "cancel")
    held = held_steps(lambda rows, earlier: (cancelled, "the timed-out job was never dropped"))
    with running_server(encoder, request_timeout=3.0) as (url, state):
        response = httpx.post(f"{url}/v1/embeddings", json={"input": QUERY_TEXTS[:3], "input_type": "query"},
                              timeout=30)  # fmt: skip
        assert response.status_code == 504 and response.json()["error"]["type"] == "timeout_error"
        wait_until(lambda: state.scheduler.accepted == 0, what="the timed-out request's items released")
        assert held.rows and set(held.rows) == {3}  # dropped mid-decode
        assert_only_new_work_decodes(encoder, url, held, "still serving")  # (a short query: well within 3 s)
    assert not held.stalled, held.stalled


def test_the_engine_thread_only_runs_the_model(encoder, monkeypatch):
    """Decoding, resizing, patching and tokenizing happen in the input workers, never on the engine thread
    nor on the event loop, for queries and documents alike."""
    from rge.serving import preparation
    from rge.tokenization import PromptTokenizer
    from rge.vision import VisionPreprocessor

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
