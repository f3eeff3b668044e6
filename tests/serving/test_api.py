"""/v1/embeddings through the official openai client and plain HTTP: results equal ``RGEEncoder.encode``
of each item alone, OpenAI's response shape, usage counts, errors, health, models and metrics."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import openai
import pytest
import torch

from ..test_candidates import cosine
from .conftest import MODEL, b64, in_thread, png_bytes, running_server

DOCUMENTS = ["a red car parked by a tree", "two cats on a sofa", "the history of the printing press"]
QUERIES = ["What is in the image?", "Which animal is on the left?"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


def test_documents_and_queries_equal_encode_of_each_item_alone(client, encoder):
    documents = client.embeddings.create(model=MODEL, input=DOCUMENTS)
    assert [entry.index for entry in documents.data] == [0, 1, 2] and documents.model == MODEL
    for text, entry in zip(DOCUMENTS, documents.data):
        assert cosine(encoder.encode_document(text), entry.embedding) >= 0.9999
        assert abs(np.linalg.norm(entry.embedding) - 1) < 1e-5
    queries = client.embeddings.create(model=MODEL, input=QUERIES,
                                       extra_body={"input_type": "query", "return_rationales": True})  # fmt: skip
    prompt_tokens = sum(len(item) for item in encoder.prepare(QUERIES, reason=True))
    generated = 0
    for text, entry in zip(QUERIES, queries.data):
        expected, rationale = encoder.encode_query(text, return_rationales=True)
        assert cosine(expected, entry.embedding) >= 0.9999
        assert entry.model_extra["rationale"] == rationale
        generated += encoder.encode_query([text], return_rationales=True)[1].num_generated_tokens[0]
    assert queries.usage.prompt_tokens == prompt_tokens
    assert queries.usage.total_tokens == prompt_tokens + generated > prompt_tokens
    assert documents.usage.total_tokens == documents.usage.prompt_tokens  # documents generate nothing


def test_images_as_base64_and_data_uris_count_their_tokens(client, encoder):
    red, blue = png_bytes((200, 30, 30)), png_bytes((30, 30, 200), (90, 200))
    inputs = [{"text": "What is this?", "image": b64(red)},
              {"image": f"data:image/png;base64,{b64(blue)}"}, "plain text"]  # fmt: skip
    got = client.embeddings.create(model=MODEL, input=inputs,
                                   extra_body={"input_type": "query", "return_rationales": True})  # fmt: skip
    items = [{"text": "What is this?", "image": red}, {"image": blue}, "plain text"]
    expected, rationales = encoder.encode_query(items, return_rationales=True)
    assert max(cosine(expected[a], expected[b]) for a, b in ((0, 1), (0, 2), (1, 2))) < 0.999  # a swap would show
    assert [entry.index for entry in got.data] == [0, 1, 2]
    for position, entry in enumerate(got.data):  # each item's own vector and rationale, in request order
        assert cosine(expected[position], entry.embedding) >= 0.9999, position
        assert entry.model_extra["rationale"] == rationales[position], position
    image_tokens = sum(len(item) for item in encoder.prepare(items[:2], reason=True))
    assert got.usage.prompt_tokens > image_tokens > 64  # the images' visual tokens are counted


def test_float_and_base64_encodings_carry_the_same_vector(server, encoder):
    url = server[0]
    as_float = httpx.post(f"{url}/v1/embeddings", json={"input": "two cats", "encoding_format": "float"}).json()
    as_b64 = httpx.post(f"{url}/v1/embeddings", json={"input": "two cats", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(__import__("base64").b64decode(as_b64["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(decoded, np.asarray(as_float["data"][0]["embedding"], dtype=np.float32))
    assert as_float["object"] == "list" and as_float["data"][0]["object"] == "embedding"


def test_models_health_and_metrics(server, client):
    url, _ = server
    assert [model.id for model in client.models.list()] == [MODEL, f"{MODEL}-query"]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    client.embeddings.create(model=MODEL, input=QUERIES, extra_body={"input_type": "query"})
    metrics = httpx.get(f"{url}/metrics").text
    names = ("rge_requests_total", "rge_items_total", "rge_queue_depth", "rge_running_queries", "rge_batch_size_bucket",
             "rge_generated_tokens_total", "rge_request_duration_seconds_bucket")  # fmt: skip
    for name in names:
        assert name in metrics, name
    generated = [line for line in metrics.splitlines() if line.startswith("rge_generated_tokens_total")]
    assert float(generated[0].split()[-1]) > 0


BAD_REQUESTS = [
    (b"{not json", 400, "not valid JSON", None),
    ({"model": MODEL}, 400, "'input' is required", "input"),
    ({"input": 3}, 400, "must be a string or a list", "input"),
    ({"input": []}, 400, "empty", "input"),
    ({"input": [[1, 2, 3]]}, 400, "check_embedding_ctx_length=False", "input"),
    ({"input": [1, 2, 3]}, 400, "token-id input", "input"),
    ({"input": ["ok", 5]}, 400, "input[1] must be a string or an object", "input[1]"),
    ({"input": [{"text": "a", "img": "x"}]}, 400, 'unknown keys ["img"]', "input[0]"),
    ({"input": ["ok", {"text": 7}]}, 400, "input[1].text must be a string", "input[1].text"),
    ({"input": ["ok", {"image": "%%%"}]}, 400, "input[1].image: image must be base64", "input[1].image"),
    (
        {"input": ["ok", {"image": b64(b"not an image")}]},
        400,
        "input[1].image: image cannot be decoded",
        "input[1].image",
    ),
    ({"input": ["ok", "look: <|image_1|>"]}, 400, "input[1]: text has an image marker but no image", "input[1]"),
    ({"input": ["ok", ""]}, 400, "input[1]: empty text and no image", "input[1]"),
    ({"input": "a", "input_type": "passage"}, 400, "'input_type' must be one of", "input_type"),
    ({"input": "a", "encoding_format": "int8"}, 400, "'encoding_format' must be one of", "encoding_format"),
    ({"input": "a", "dimensions": 8}, 400, "'dimensions' must be 64", "dimensions"),
    ({"input": "a", "model": "text-embedding-3-small"}, 404, "does not exist", "model"),
    ({"input": "a", "model": f"{MODEL}-query", "input_type": "document"}, 400, "embeds queries", "input_type"),
    ({"input": ["x"] * 300}, 400, "at most 256 per request", "input"),
]


@pytest.mark.parametrize(("body", "status", "message", "param"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors_naming_the_item(server, body, status, message, param):
    url = server[0]
    if isinstance(body, bytes):
        response = httpx.post(f"{url}/v1/embeddings", content=body, headers={"content-type": "application/json"})
    else:
        response = httpx.post(f"{url}/v1/embeddings", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}


def test_bad_requests_never_disturb_requests_in_flight(server, encoder, slow_steps):
    slow_steps(0.01)
    client = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)
    good = [in_thread(lambda text=text: client.embeddings.create(model=MODEL, input=[text],
                                                                 extra_body={"input_type": "query"}))
            for text in QUERIES]  # fmt: skip
    for body, *_ in BAD_REQUESTS:
        if not isinstance(body, bytes):
            assert httpx.post(f"{server[0]}/v1/embeddings", json=body).status_code >= 400
    for (thread, outcome), text in zip(good, QUERIES):
        thread.join(60)
        assert cosine(encoder.encode_query(text), outcome["result"].data[0].embedding) >= 0.9999


def test_health_is_not_ready_until_the_model_is_loaded(encoder):
    from rge.serving import ServerSettings, create_app

    from ..live_server import free_port

    release = threading.Event()
    settings = ServerSettings(model_names=(MODEL,), torch_threads=torch.get_num_threads())
    app = create_app(settings, lambda: release.wait(30) and encoder)
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        from .conftest import wait_until

        wait_until(lambda: server.started)
        loading = httpx.get(f"{url}/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        early = httpx.post(f"{url}/v1/embeddings", json={"input": "a"})
        assert early.status_code == 503 and early.headers["retry-after"] == "1"
        release.set()
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 200)
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "a"}).status_code == 200
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)


def test_a_model_that_fails_to_load_is_reported(encoder):
    failures = []

    def broken():
        raise OSError("no such checkpoint")

    from rge.serving import ServerSettings, create_app

    app = create_app(ServerSettings(), broken, on_load_error=failures.append)
    from fastapi.testclient import TestClient

    with TestClient(app) as http:
        from .conftest import wait_until

        wait_until(lambda: bool(failures))
        health = http.get("/health")
        assert health.status_code == 503 and "no such checkpoint" in health.json()["error"]
    assert isinstance(failures[0], OSError)


def test_body_size_limit_declared_and_streamed(encoder):
    with running_server(encoder, max_body_bytes=2000) as (url, _):
        declared = httpx.post(f"{url}/v1/embeddings", json={"input": "x" * 5000})
        assert declared.status_code == 413 and "at most 2000" in declared.json()["error"]["message"]

        def chunks():
            yield b'{"input": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'

        streamed = httpx.post(f"{url}/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413 and "over 2000 bytes" in streamed.json()["error"]["message"]
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "small"}).status_code == 200


def test_inputs_over_max_length_are_refused_naming_the_item(encoder):
    from rge import RGEEncoder

    short = RGEEncoder(encoder.checkpoint, max_new_tokens=8, max_length=60)
    with running_server(short) as (url, _):
        response = httpx.post(f"{url}/v1/embeddings", json={"input": ["ok", "word " * 60], "input_type": "query"})
        assert response.status_code == 400
        assert response.json()["error"]["message"].startswith("input[1]: prompt of ")
        assert "plus 8 reasoning tokens exceeds max_length=60" in response.json()["error"]["message"]


def test_decoded_image_pixel_limit(encoder):
    with running_server(encoder, max_image_pixels=100 * 100) as (url, _):
        big = {"input": [{"text": "x", "image": b64(png_bytes((1, 2, 3), (101, 100)))}]}
        response = httpx.post(f"{url}/v1/embeddings", json=big)
        assert response.status_code == 400
        assert "101x100 pixels; this server accepts at most 10000" in response.json()["error"]["message"]
        small = {"input": [{"text": "x", "image": b64(png_bytes((1, 2, 3), (100, 100)))}]}
        assert httpx.post(f"{url}/v1/embeddings", json=small).status_code == 200


def test_a_requests_images_share_one_pixel_budget(encoder):
    with running_server(encoder, max_request_pixels=15_000) as (url, _):
        image = b64(png_bytes((1, 2, 3), (100, 100)))
        response = httpx.post(f"{url}/v1/embeddings", json={"input": [{"image": image}, {"image": image}]})
        assert response.status_code == 400 and response.json()["error"]["param"] == "input[1].image"
        assert "more than 15000 pixels together" in response.json()["error"]["message"]
        assert httpx.post(f"{url}/v1/embeddings", json={"input": [{"image": image}]}).status_code == 200


def test_prompts_by_name_or_text_and_the_operators_defaults(encoder):
    text = "What colour is the car?"
    vqa = encoder.encode_query(text, prompt_name="vqa")
    literal = encoder.encode_query(text, prompt="Answer briefly: ")
    plain_document = encoder.encode_document(text)
    with running_server(encoder, query_prompt_name="vqa") as (url, _):

        def query(**fields):
            body = {"input": text, "input_type": "query", **fields}
            return httpx.post(f"{url}/v1/embeddings", json=body, timeout=60).json()["data"][0]["embedding"]

        assert cosine(vqa, query()) >= 0.9999  # the operator's default for queries
        assert cosine(vqa, query(prompt_name="vqa_query")) >= 0.9999
        assert cosine(literal, query(prompt="Answer briefly: ")) >= 0.9999  # a request's own prompt wins
        assert cosine(vqa, literal) < 0.9999  # (the prompts make a difference)
        document = httpx.post(f"{url}/v1/embeddings", json={"input": text}).json()["data"][0]["embedding"]
        assert cosine(plain_document, document) >= 0.9999  # no default for documents


def test_api_key_guards_every_route_but_health(encoder, monkeypatch):
    with running_server(encoder, api_key="s3cret") as (url, _):
        assert httpx.get(f"{url}/health").status_code == 200
        for method, route in (("POST", "/v1/embeddings"), ("GET", "/v1/models"), ("GET", "/metrics")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                response = httpx.request(method, f"{url}{route}", json={"input": "a"}, headers=headers)
                assert response.status_code == 401, (route, headers)
                assert response.json()["error"]["code"] == "invalid_api_key"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert len(client.embeddings.create(model=MODEL, input="a").data[0].embedding) == 64
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).embeddings.create(model=MODEL, input="a")
