"""The HTTP app: OpenAI-compatible ``/v1/embeddings``, ``/v1/models``, ``/health`` and ``/metrics``.

The model loads in a background thread when the app starts, so ``/health`` can say "loading" (503)
until it is ready. The event loop only moves bytes: a body is read within ``body_timeout``, then parsed
and prepared in worker threads (``preparation.py``) and handed to the engine loop (``scheduler.py``);
each request awaits only its own items, and a client that disconnects or runs out of time has its
unfinished items dropped from the batch. Every answer, errors included, has OpenAI's shape and is
counted in ``/metrics``. When the server stops, requests in flight have ``shutdown_timeout`` seconds to
finish; then they get 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .bodies import BodyLimit, BodyTooLarge
from .metrics import Metrics, MetricsMiddleware
from .preparation import RequestPreparer
from .protocol import APIError, EmbeddingRequest, embedding_data, invalid, show
from .scheduler import JobResult, Scheduler, ServedEncoder
from .settings import ServerSettings

logger = logging.getLogger("rge.serving")
T = TypeVar("T")


class ServerState:
    """What the routes share: settings, metrics, and (once loaded) the encoder, its preparer and engine loop."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.encoder: Any = None
        self.scheduler: Scheduler | None = None
        self.preparer: RequestPreparer | None = None
        self.load_error: str | None = None
        self.load_exception: BaseException | None = None
        self.created = int(time.time())
        self.stopping = False
        self.drained: asyncio.Future[None] | None = None
        """Done when the shutdown's grace period is over: whatever is still waiting answers 503 (made when the
        app starts, on its event loop)."""

    def load(self, load_encoder: Callable[[], ServedEncoder]) -> None:
        try:
            encoder = load_encoder()
        except Exception as error:
            self.load_error, self.load_exception = f"{type(error).__name__}: {error}", error
            return
        threads = self.settings.model_threads(encoder.device.type)
        if threads is not None:
            torch.set_num_threads(threads)
        scheduler = Scheduler(encoder, self.settings, self.metrics)
        scheduler.start()
        self.encoder, self.preparer, self.scheduler = encoder, RequestPreparer(encoder, self.settings), scheduler
        logger.info("rge: model loaded on %s; ready", encoder.device)

    def ready(self) -> tuple[RequestPreparer, Scheduler]:
        if self.stopping:
            raise _unavailable("the server is shutting down", self.settings)
        if self.scheduler is None or self.preparer is None:
            raise _unavailable(f"the model is {'failed to load' if self.load_error else 'loading'}", self.settings)
        return self.preparer, self.scheduler

    def begin_shutdown(self) -> None:
        """Refuse new requests; in ``shutdown_timeout`` seconds, answer 503 to those still in flight."""
        self.stopping = True
        if self.drained is not None:
            asyncio.get_running_loop().call_later(self.settings.shutdown_timeout, self.drain)

    def drain(self) -> None:
        """End the grace period: requests still waiting answer 503."""
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    async def bounded(self, work: Awaitable[T], timeout: float, late: APIError) -> T:
        """``work``'s result, or ``late`` after ``timeout`` seconds, or 503 once the shutdown's grace is over."""
        task = asyncio.ensure_future(work)
        waited: set[asyncio.Future[Any]] = {task} if self.drained is None else {task, self.drained}
        done, _ = await asyncio.wait(waited, timeout=max(0.0, timeout), return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        if self.drained is not None and self.drained.done():
            raise _unavailable("the server is shutting down", self.settings)
        raise late


def create_app(
    settings: ServerSettings,
    load_encoder: Callable[[], ServedEncoder],
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """An app serving the encoder ``load_encoder()`` returns (called once, in a thread, at startup).

    If loading fails, ``/health`` says so (503) and ``on_load_error`` gets the exception. A server that
    runs it calls ``app.state.rge.begin_shutdown()`` when it is asked to stop (``rge serve`` does).
    """
    state = ServerState(settings)

    def load() -> None:
        state.load(load_encoder)
        if state.load_exception is None:
            return
        if on_load_error is not None:  # it says so its own way (rge serve: one line, as it exits)
            on_load_error(state.load_exception)
        else:
            logger.error("rge serve: the model failed to load (%s)", state.load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.drained = asyncio.get_running_loop().create_future()
        # A daemon thread: a shutdown during a long load (a download) does not wait for it.
        threading.Thread(target=load, name="rge-load", daemon=True).start()
        yield
        state.drain()
        if state.scheduler is not None:
            await asyncio.to_thread(state.scheduler.stop, settings.shutdown_timeout)
        if state.preparer is not None:
            state.preparer.close()

    app = FastAPI(title="rge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)  # fmt: skip
    app.state.rge = state
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return ErrorResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, error: BodyTooLarge) -> JSONResponse:
        return await api_error(request, APIError(413, str(error)))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        message = {404: f"no route {show(request.url.path)}", 405: f"{request.method} is not allowed here"}.get(
            error.status_code, str(error.detail)
        )
        return await api_error(request, APIError(error.status_code, message, kind=kind, headers=error.headers))

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        if state.scheduler is not None and not state.stopping:
            return JSONResponse({"status": "ok"})
        status = "stopping" if state.stopping else "failed" if state.load_error else "loading"
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _authorize(request, settings)
        data = [{"id": name, "object": "model", "created": state.created, "owned_by": "rge", **settings.extra}
                for name in settings.served_names]  # fmt: skip
        return JSONResponse({"object": "list", "data": data})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        _authorize(request, settings)
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        started = time.monotonic()
        _authorize(request, settings)
        preparer, scheduler = state.ready()
        try:
            return await _embed(state, request, preparer, scheduler, started)
        except (APIError, BodyTooLarge):
            raise
        except Exception:  # a bug, not the client's fault: logged once, answered in OpenAI's shape
            logger.exception("rge serve: a request failed")
            raise APIError(500, "the server failed on this request", kind="server_error") from None

    return app


async def _embed(
    state: ServerState, request: Request, preparer: RequestPreparer, scheduler: Scheduler, started: float
) -> Response:
    settings = state.settings
    deadline = started + settings.request_timeout
    late = APIError(504, f"the request took longer than {settings.request_timeout:g} s", kind="timeout_error")
    remaining = deadline - time.monotonic()
    slow_body = APIError(408, f"the request body did not arrive within {settings.body_timeout:g} s",
                         code="body_timeout")  # fmt: skip
    try:
        body = await state.bounded(request.body(), min(remaining, settings.body_timeout),
                                   slow_body if settings.body_timeout < remaining else late)  # fmt: skip
    except ClientDisconnect:
        logger.info("rge serve: a client left while sending its body")
        return Response(status_code=499)  # nobody reads this
    parsed = _check(await state.bounded(preparer.parse(body), deadline - time.monotonic(), late), state)
    count = len(parsed.items)
    if count > settings.max_queued_items:
        raise APIError(413, f"the request has {count} items; this server queues at most {settings.max_queued_items}")
    if not scheduler.reserve(count):
        raise APIError(429, f"the server's queue is full ({settings.max_queued_items} items); retry later",
                       kind="rate_limit_error", headers={"Retry-After": str(settings.retry_after)})  # fmt: skip
    abandoned = threading.Event()  # tells the workers to stop preparing a request nobody waits for
    try:
        items = await state.bounded(preparer.prepare(parsed, abandoned), deadline - time.monotonic(), late)
    except BaseException:
        abandoned.set()
        scheduler.release(count)
        raise
    job_id, future = scheduler.submit(items, parsed.reason)
    result = await _await_result(state, request, scheduler, job_id, future, deadline, late)
    if result is None:
        return Response(status_code=499)  # the client left; nobody reads this
    answer = preparer.in_lane(preparer.text_lane, _answer, state, parsed, items, result)
    content = await state.bounded(answer, deadline - time.monotonic(), late)
    state.metrics.items.labels(parsed.input_type).inc(count)
    state.metrics.latency.labels(parsed.input_type).observe(time.monotonic() - started)
    return Response(content, media_type="application/json")


def _authorize(request: Request, settings: ServerSettings) -> None:
    if settings.api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), settings.api_key.encode()):
        raise APIError(401, "a valid API key is required (Authorization: Bearer <key>)",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


def _unavailable(message: str, settings: ServerSettings) -> APIError:
    return APIError(503, message, kind="server_error", headers={"Retry-After": str(settings.retry_after)})


def _check(parsed: EmbeddingRequest, state: ServerState) -> EmbeddingRequest:
    settings, dimension = state.settings, state.encoder.embedding_dim
    if parsed.model is not None and parsed.model not in settings.served_names:
        served = ", ".join(map(show, settings.served_names))
        message = f"the model {show(parsed.model)} does not exist; this server serves {served}"
        raise APIError(404, message, param="model", code="model_not_found")
    if parsed.dimensions is not None and parsed.dimensions != dimension:
        raise invalid(f"'dimensions' must be {dimension} (this model's size) or omitted", param="dimensions")
    return parsed


async def _await_result(
    state: ServerState,
    request: Request,
    scheduler: Scheduler,
    job_id: int,
    future: asyncio.Future[JobResult],
    deadline: float,
    late: APIError,
) -> JobResult | None:
    """The job's result; None if the client disconnected first. Any other way out drops its unfinished items."""
    gone = asyncio.ensure_future(_disconnected(request))

    async def first() -> JobResult | None:
        waited: list[asyncio.Future[Any]] = [future, gone]
        await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        return future.result() if future.done() else None

    result: JobResult | None = None
    try:
        result = await state.bounded(first(), deadline - time.monotonic(), late)
    finally:
        gone.cancel()
        if result is None:
            scheduler.cancel(job_id)
            future.cancel()
    return result


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _answer(state: ServerState, parsed: EmbeddingRequest, items: list[Any], result: JobResult) -> bytes:
    """The response body, serialised (in a worker: a large answer takes a while to write)."""
    prompt_tokens = sum(len(item) for item in items)
    generated = sum(len(ids) for ids in result.generated)
    rationales = state.encoder.rationale_texts(result.generated) if parsed.return_rationales and parsed.reason else None
    state.metrics.prompt_tokens.inc(prompt_tokens)
    body = {
        "object": "list",
        "data": embedding_data(result.embeddings, parsed.encoding_format, rationales),
        "model": parsed.model or state.settings.model_names[0],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + generated},
    }
    return json.dumps(body, separators=(",", ":")).encode()


class ErrorResponse(JSONResponse):
    """OpenAI's error body, written in ASCII: whatever a message quotes, it encodes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()
