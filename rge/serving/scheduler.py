"""The engine loop: one thread owns the model; requests hand it items and await their own results.

The thread only runs the model. Items arrive prepared (``preparation.py``); the patches of their images
are made by the encoder's input workers while the items wait (``InputPipeline.prefetch``), and an item
is admitted only once they are ready: a worker that finishes some wakes the loop.

Queries of all requests share one ``DecodeStream``: a query that arrives while others decode is admitted
at a step boundary, and a request is answered as soon as its own queries are finished. Documents of
concurrent requests wait up to ``batch_wait`` seconds (or until a full batch waits) to share a forward
pass, whose rows are sorted by length. A cancelled request (client gone, timeout) leaves at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import torch

from ..engine.batching import TokenizedItem
from ..engine.pooling import l2_normalize
from ..engine.stream import DecodeStream, FinishedQuery
from .metrics import Metrics
from .protocol import APIError
from .settings import ServerSettings

if TYPE_CHECKING:
    from ..engine.decoder import ReasoningDecoder
    from ..pipeline import InputPipeline

logger = logging.getLogger("rge.serving")


@dataclass
class JobResult:
    """A request's answer: L2-normalised float32 embeddings (N, D) and each item's generated token ids."""

    embeddings: np.ndarray
    generated: list[list[int]]


@dataclass
class _Job:
    id: int
    items: Sequence[TokenizedItem]
    reason: bool
    future: asyncio.Future[JobResult]
    loop: asyncio.AbstractEventLoop
    vectors: list[torch.Tensor | None] = field(default_factory=list)
    generated: list[list[int]] = field(default_factory=list)
    remaining: int = 0


@dataclass(frozen=True)
class _Cancel:
    job_id: int


class ServedEncoder(Protocol):
    """What the server drives: an encoder's lower-level side (``RGEEncoder`` is one). Requests are prepared
    with ``prepare`` (and ``inputs``' workers), queries run in ``query_decoder``'s stream, documents through
    ``candidate_embeddings``."""

    inputs: InputPipeline

    @property
    def device(self) -> torch.device: ...

    @property
    def embedding_dim(self) -> int: ...

    def prepare(self, texts: Any, images: Any = None, *, reason: bool, prompt: str = "") -> list[TokenizedItem]: ...

    def query_decoder(self, batch_size: int) -> ReasoningDecoder: ...

    def candidate_embeddings(self, items: Sequence[TokenizedItem], batch_size: int) -> torch.Tensor: ...

    def rationale_texts(self, token_ids: Sequence[Sequence[int]]) -> list[str]: ...


_STOP = object()
_WAKE = object()  # some waiting item's inputs are ready


class Scheduler:
    """Owns the encoder's model in one thread; ``submit`` from the event loop, await the future."""

    def __init__(self, encoder: ServedEncoder, settings: ServerSettings, metrics: Metrics) -> None:
        self.encoder, self.settings, self.metrics = encoder, settings, metrics
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._accepted = 0
        self._thread = threading.Thread(target=self._run, name="rge-engine", daemon=True)
        self._jobs: dict[int, _Job] = {}
        self._documents: deque[tuple[tuple[int, int], TokenizedItem, float]] = deque()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Answer what is left with 503 and end the loop (waiting ``timeout`` seconds at most for a step)."""
        self._inbox.put(_STOP)
        self._thread.join(timeout)

    def reserve(self, count: int) -> bool:
        """Count ``count`` items against the queue limit; False when they do not fit."""
        with self._lock:
            if self._accepted + count > self.settings.max_queued_items:
                return False
            self._accepted += count
            self.metrics.accepted_items.set(self._accepted)
            return True

    def release(self, count: int) -> None:
        """Give back ``count`` reserved items that will not be submitted (their request failed first)."""
        with self._lock:
            self._accepted -= count
            self.metrics.accepted_items.set(self._accepted)

    @property
    def accepted(self) -> int:
        """Items reserved and not yet finished (the queue limit applies to this)."""
        return self._accepted

    def submit(self, items: Sequence[TokenizedItem], reason: bool) -> tuple[int, asyncio.Future[JobResult]]:
        """Hand reserved, prepared items (indexed 0..N-1) to the engine; call from the event loop."""
        loop = asyncio.get_running_loop()
        job = _Job(next(self._ids), items, reason, loop.create_future(), loop)
        self._inbox.put(job)
        return job.id, job.future

    def cancel(self, job_id: int) -> None:
        """Drop a job's unfinished items (the client left or its time ran out)."""
        self._inbox.put(_Cancel(job_id))

    # ---------------------------------------------------------------- the engine thread

    def _run(self) -> None:
        stream = self._new_stream()
        with torch.inference_mode():
            while True:
                messages = self._receive(self._wait_time(stream))
                if any(message is _STOP for message in messages):
                    self._fail_all(APIError(503, "the server is shutting down", kind="server_error"))
                    return
                for message in messages:
                    self._accept(message, stream)
                if self._documents_due():
                    self._embed_documents()
                if stream.can_step:
                    stream = self._step(stream)
                self.metrics.queue_depth.set(stream.waiting + len(self._documents))
                self.metrics.running_queries.set(stream.running)

    def _new_stream(self) -> DecodeStream:
        decoder = self.encoder.query_decoder(self.settings.batch_size)
        return decoder.stream(on_ready=self._wake)  # type: ignore[no-any-return]

    def _wake(self) -> None:
        self._inbox.put(_WAKE)

    def _wait_time(self, stream: DecodeStream) -> float | None:
        """How long the loop may block on its inbox: not at all while it can decode, until the oldest
        document's wait ends when the next batch of documents is ready, else until something arrives (a
        request, a cancellation, or inputs made ready)."""
        if stream.can_step:
            return 0.0
        head = self._next_documents()
        if head and all(item.ready() for _, item, _ in head):
            return max(0.0, head[0][2] + self.settings.batch_wait - time.monotonic())
        return None

    def _receive(self, timeout: float | None) -> list[Any]:
        messages = []
        try:
            messages.append(self._inbox.get(timeout=timeout) if timeout != 0 else self._inbox.get_nowait())
            while True:
                messages.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        return messages

    def _accept(self, message: Any, stream: DecodeStream) -> None:
        if message is _WAKE:
            return
        if isinstance(message, _Cancel):
            job = self._jobs.pop(message.job_id, None)
            if job is not None:
                stream.cancel((job.id, position) for position in range(len(job.items)))
                self._drop_documents(job.id)
                self.release(job.remaining)
            return
        job = message
        job.vectors, job.generated, job.remaining = [None] * len(job.items), [[] for _ in job.items], len(job.items)
        self._jobs[job.id] = job
        if job.reason:
            stream.submit(((job.id, item.index), item) for item in job.items)
        else:
            now = time.monotonic()
            self._documents.extend(((job.id, item.index), item, now) for item in job.items)
            self._prefetch_documents()

    def _prefetch_documents(self) -> None:
        """Start the image work of the next two batches of documents (after any change to the queue)."""
        ahead = [item for _, item, _ in itertools.islice(self._documents, 2 * self.settings.batch_size)]
        self.encoder.inputs.prefetch(ahead, self._wake)

    def _next_documents(self) -> list[tuple[tuple[int, int], TokenizedItem, float]]:
        """The next batch of documents, in arrival order."""
        return list(itertools.islice(self._documents, self.settings.batch_size))

    def _documents_due(self) -> bool:
        """A batch runs once its inputs are all ready, when it is full or its oldest document has waited
        ``batch_wait`` (a document's image work takes a moment: the batch waits for it, not without it)."""
        head = self._next_documents()
        if not head or not all(item.ready() for _, item, _ in head):
            return False
        return len(head) == self.settings.batch_size or time.monotonic() - head[0][2] >= self.settings.batch_wait

    def _embed_documents(self) -> None:
        taken = [self._documents.popleft() for _ in range(min(self.settings.batch_size, len(self._documents)))]
        self._prefetch_documents()
        items = [replace(item, index=row) for row, (_, item, _) in enumerate(taken)]
        self.metrics.batch_size.labels("documents").observe(len(items))
        try:
            vectors = self.encoder.candidate_embeddings(items, self.settings.batch_size)
        except Exception as error:  # a failed batch fails its requests, not the server
            logger.exception("document batch failed")
            for job_id in {key[0] for key, _, _ in taken}:
                self._fail(job_id, error)
            return
        for (key, _, _), vector in zip(taken, vectors):
            self._deliver(key, vector, [])

    def _step(self, stream: DecodeStream) -> DecodeStream:
        try:
            finished: list[FinishedQuery] = stream.step()
        except Exception as error:  # the running batch is lost: fail its requests, start a new one
            logger.exception("decode step failed")
            for job_id in [job.id for job in self._jobs.values() if job.reason]:
                self._fail(job_id, error)
            return self._new_stream()
        if stream.running or finished:
            self.metrics.batch_size.labels("decode").observe(stream.running + len(finished))
        for query in finished:
            self.metrics.generated_tokens.inc(len(query.token_ids))
            self._deliver(query.key, query.embedding, query.token_ids)
        return stream

    def _deliver(self, key: Hashable, vector: torch.Tensor, generated: list[int]) -> None:
        job_id, position = cast(tuple[int, int], key)
        job = self._jobs.get(job_id)
        if job is None:
            return
        job.vectors[position], job.generated[position] = vector, generated
        job.remaining -= 1
        self.release(1)
        if job.remaining:
            return
        del self._jobs[job_id]
        embeddings = l2_normalize(torch.stack(job.vectors)).numpy()  # type: ignore[arg-type]
        _resolve(job, result=JobResult(embeddings, job.generated))

    def _fail(self, job_id: int, error: Exception) -> None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        self.release(job.remaining)
        self._drop_documents(job_id)
        if not isinstance(error, APIError):
            error = APIError(500, f"the engine failed on this request ({type(error).__name__})", kind="server_error")
        _resolve(job, error=error)

    def _drop_documents(self, job_id: int) -> None:
        self._documents = deque(entry for entry in self._documents if entry[0][0] != job_id)
        self._prefetch_documents()

    def _fail_all(self, error: APIError) -> None:
        for job_id in list(self._jobs):
            self._fail(job_id, error)


def _resolve(job: _Job, *, result: JobResult | None = None, error: Exception | None = None) -> None:
    """Settle a job's future from the engine thread (a future the client abandoned is left alone)."""

    def settle() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)  # type: ignore[arg-type]

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the event loop has closed (shutdown)
        pass
