"""The HTTP app: OpenAI-compatible ``/v1/embeddings``, ``/v1/models``, ``/health`` and ``/metrics``.

The model loads in a background thread when the app starts, so ``/health`` can say "loading" (503)
until it is ready. Requests are validated and their images decoded in worker threads, then handed to
the engine loop (``scheduler.py``); each awaits only its own items, and a client that disconnects or
runs out of time has its unfinished items dropped from the batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..errors import RGEInputError
from .images import ImageRejected, decode_image
from .limits import BodyLimit, BodyTooLarge
from .metrics import Metrics
from .protocol import APIError, EmbeddingRequest, embedding_data, invalid, parse_request
from .scheduler import JobResult, Scheduler
from .settings import ServerSettings

logger = logging.getLogger("rge.serving")


class ServerState:
    """What the routes share: settings, metrics, and (once loaded) the encoder and its engine loop."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.encoder: Any = None
        self.scheduler: Scheduler | None = None
        self.load_error: str | None = None
        self.load_exception: BaseException | None = None
        self.created = int(time.time())
        self.tokenizer_lock = threading.Lock()  # a fast tokenizer is not safe to share between threads

    def load(self, load_encoder: Callable[[], Any]) -> None:
        try:
            encoder = load_encoder()
        except Exception as error:
            self.load_error, self.load_exception = f"{type(error).__name__}: {error}", error
            logger.error("rge serve: the model failed to load (%s)", self.load_error)
            return
        scheduler = Scheduler(encoder, self.settings, self.metrics)
        scheduler.start()
        self.encoder, self.scheduler = encoder, scheduler
        logging.getLogger("uvicorn.error").info("rge: model loaded on %s; ready", encoder.device)

    def ready(self) -> tuple[Any, Scheduler]:
        if self.scheduler is None:
            status = "failed to load" if self.load_error else "loading"
            raise APIError(503, f"the model is {status}", kind="server_error",
                           headers={"Retry-After": str(self.settings.retry_after)})  # fmt: skip
        return self.encoder, self.scheduler


def create_app(
    settings: ServerSettings,
    load_encoder: Callable[[], Any],
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """An app serving the encoder ``load_encoder()`` returns (called once, in a thread, at startup).

    If loading fails, ``/health`` says so (503) and ``on_load_error`` gets the exception.
    """
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.ensure_future(asyncio.to_thread(state.load, load_encoder))
        if on_load_error is not None:
            loading.add_done_callback(lambda _: state.load_exception and on_load_error(state.load_exception))
        yield
        await loading
        if state.scheduler is not None:
            await asyncio.to_thread(state.scheduler.stop)

    app = FastAPI(title="rge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.rge = state
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return _error_response(state, request, error)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, error: BodyTooLarge) -> JSONResponse:
        return _error_response(state, request, APIError(413, str(error)))

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.scheduler is not None:
            return JSONResponse({"status": "ok"})
        status = "failed" if state.load_error else "loading"
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _authorize(request, settings)
        data = [{"id": name, "object": "model", "created": state.created, "owned_by": "rge", **settings.extra}
                for name in settings.model_names]  # fmt: skip
        return _answer(state, request, {"object": "list", "data": data})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        _authorize(request, settings)
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        started = time.monotonic()
        _authorize(request, settings)
        encoder, scheduler = state.ready()
        parsed = _check(parse_request(await _json_body(request), settings), encoder, settings)
        items = await run_in_threadpool(_prepare, state, parsed)
        if not scheduler.reserve(len(items)):
            raise APIError(429, f"the server's queue is full ({settings.max_queued_items} items); retry later",
                           kind="rate_limit_error", headers={"Retry-After": str(settings.retry_after)})  # fmt: skip
        job_id, future = scheduler.submit(items, parsed.input_type == "query")
        result = await _await_result(request, scheduler, job_id, future, settings.request_timeout)
        if result is None:
            return Response(status_code=499)  # the client left; nobody reads this
        body = await run_in_threadpool(_response_body, state, parsed, items, result)
        state.metrics.items.labels(parsed.input_type).inc(len(items))
        state.metrics.latency.labels(parsed.input_type).observe(time.monotonic() - started)
        return _answer(state, request, body)

    return app


def _authorize(request: Request, settings: ServerSettings) -> None:
    if settings.api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), settings.api_key.encode()):
        raise APIError(401, "a valid API key is required (Authorization: Bearer <key>)",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


async def _json_body(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise invalid(f"the request body is not valid JSON ({error})", param=None) from None  # type: ignore[arg-type]


def _check(parsed: EmbeddingRequest, encoder: Any, settings: ServerSettings) -> EmbeddingRequest:
    if parsed.model is not None and parsed.model not in settings.model_names:
        served = ", ".join(map(repr, settings.model_names))
        message = f"the model {parsed.model!r} does not exist; this server serves {served}"
        raise APIError(404, message, param="model", code="model_not_found")
    if parsed.dimensions is not None and parsed.dimensions != encoder.embedding_dim:
        raise invalid(f"'dimensions' must be {encoder.embedding_dim} (this model's size) or omitted",
                      param="dimensions")  # fmt: skip
    return parsed


def _prepare(state: ServerState, parsed: EmbeddingRequest) -> list[Any]:
    """Decode images and tokenize (in a worker thread); a bad item is a 400 naming its index."""
    entries = []
    for index, item in enumerate(parsed.items):
        try:
            image = None if item.image is None else decode_image(item.image, state.settings)
        except ImageRejected as error:
            raise invalid(f"input[{index}].image: {error}", param=f"input[{index}].image") from None
        entries.append({"text": item.text, "image": image})
    try:
        with state.tokenizer_lock:
            return state.encoder.prepare(entries, reason=parsed.input_type == "query")  # type: ignore[no-any-return]
    except RGEInputError as error:
        failed = error.index
        message = str(error).removeprefix(f"item {failed}: ")
        raise invalid(f"input[{failed}]: {message}" if failed is not None else message) from None


async def _await_result(
    request: Request, scheduler: Scheduler, job_id: int, future: asyncio.Future[JobResult], timeout: float
) -> JobResult | None:
    """The job's result; None if the client disconnected first. Either way out, unfinished items are dropped."""
    gone = asyncio.ensure_future(_disconnected(request))
    waited: set[asyncio.Future[Any]] = {future, gone}
    try:
        done, _ = await asyncio.wait(waited, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if future in done:
        return future.result()
    scheduler.cancel(job_id)
    future.cancel()
    if gone in done:
        return None
    raise APIError(504, f"the request took longer than {timeout:g} s", kind="timeout_error")


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _response_body(state: ServerState, parsed: EmbeddingRequest, items: list[Any], result: JobResult) -> dict:
    prompt_tokens = sum(len(item) for item in items)
    generated = sum(len(ids) for ids in result.generated)
    rationales = None
    if parsed.return_rationales and parsed.input_type == "query":
        with state.tokenizer_lock:
            rationales = state.encoder.rationale_texts(result.generated)
    state.metrics.prompt_tokens.inc(prompt_tokens)
    return {
        "object": "list",
        "data": embedding_data(result.embeddings, parsed.encoding_format, rationales),
        "model": parsed.model or state.settings.model_names[0],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + generated},
    }


def _answer(state: ServerState, request: Request, body: Any) -> JSONResponse:
    state.metrics.requests.labels(request.url.path, "200").inc()
    return JSONResponse(body)


def _error_response(state: ServerState, request: Request, error: APIError) -> JSONResponse:
    state.metrics.requests.labels(request.url.path, str(error.status)).inc()
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)
