"""What an operator sets for ``rge serve``: limits, security, batching and lifecycle, with safe defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..prompts import resolve_prompt

DEFAULT_INPUT_WORKERS = 4
"""``ServerSettings.input_workers`` unless the process may use fewer cores."""


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the system tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class ServerSettings:
    """Limits, security and batching of one server (one engine).

    Every limit is enforced before the request reaches the engine, except ``request_timeout`` (which
    drops the request's unfinished items from the running batch when it expires).
    """

    model_names: tuple[str, ...] = ("rge",)
    """Names the server answers to; requests naming another model get 404 (the first one is reported)."""
    query_model_suffix: str = "-query"
    """Each model name with this suffix is served too, for queries (``"rge-query"``: ``input_type`` defaults to
    ``"query"``), for clients that cannot add fields to a request; ``""``: no such names."""
    api_key: str | None = field(default=None, repr=False)
    """When set, every route but ``/health`` needs ``Authorization: Bearer <api_key>`` (left out of the repr, so
    printed or logged settings do not show it)."""
    batch_size: int = 32
    """Queries decoded together (the running batch) and documents per forward pass."""
    batch_wait: float = 0.005
    """Seconds a document waits for others to share its forward pass (unless a full batch is waiting)."""
    max_queued_items: int = 1024
    """Items accepted and not yet finished, over all requests; beyond it, 429 with ``Retry-After`` (413 for a
    request larger than the whole queue)."""
    max_items_per_request: int = 256
    max_body_bytes: int = 32 * 2**20
    max_image_pixels: int = 6000 * 6000
    """Largest decoded image (width x height) accepted, checked before the pixels are decoded."""
    max_request_pixels: int = 128_000_000
    """Decoded pixels of all images of one request together, checked before each is decoded."""
    request_timeout: float = 300.0
    """Seconds a request may take from its first byte (body, preparation and the engine); then 504, and its
    unfinished items leave the batch."""
    header_timeout: float = 10.0
    """Seconds a connection may take to send a request's headers; then it is closed."""
    body_timeout: float = 60.0
    """Seconds a request's body may take to arrive; then 408."""
    shutdown_timeout: float = 30.0
    """On SIGTERM or Ctrl-C: seconds in-flight requests have to finish; then they get 503 and the process
    exits."""
    image_hosts: tuple[str, ...] = ()
    """Hosts whose ``http(s)`` image URLs are fetched (exact names, or ``.example.com`` for subdomains).
    Empty: URLs are refused."""
    private_image_hosts: bool = False
    """Allow allow-listed hosts that resolve to private, loopback or link-local addresses."""
    image_fetch_timeout: float = 10.0
    """Seconds one image URL may take in all: resolving, connecting, and every byte of the answer."""
    image_fetch_max_bytes: int = 20 * 2**20
    max_concurrent_fetches: int = 16
    """Image URLs fetched at once, over all requests (fetches wait on the network, not the CPU)."""
    input_workers: int = field(default_factory=lambda: min(DEFAULT_INPUT_WORKERS, available_cores()))
    """Threads that decode, resize and tokenize requests with images (requests without images have two
    threads of their own, so a request of large images never delays a text request)."""
    torch_threads: int | None = None
    """Threads torch runs the model with on the CPU. None: the cores this process may use, less one per input
    worker up to half of them (at least one), so that decoding images rarely makes the model wait for a
    core; on CUDA, torch's own setting."""
    query_prompt_name: str | None = None
    """A task of ``rge.prompts.TASK_PROMPTS`` put before every query text that names no prompt itself."""
    query_prompt: str | None = None
    """A literal instruction put before every query text that names no prompt itself."""
    document_prompt_name: str | None = None
    document_prompt: str | None = None
    retry_after: int = 1
    """Seconds a 429 or 503 answer asks the client to wait."""
    extra: dict[str, object] = field(default_factory=dict)
    """Free-form facts shown on ``/v1/models`` (the checkpoint's revision, the pixel budget...)."""

    def __post_init__(self) -> None:
        if not self.model_names:
            raise ValueError("a server needs at least one model name")
        taken = set(self.model_names) & set(self.query_model_names)
        if taken:
            raise ValueError(f"{', '.join(sorted(taken))} would name both a model and the query name of another; "
                             "choose another query model suffix")  # fmt: skip
        for name in ("batch_size", "max_queued_items", "max_items_per_request", "max_body_bytes",
                     "max_image_pixels", "max_request_pixels", "image_fetch_max_bytes", "max_concurrent_fetches",
                     "input_workers"):  # fmt: skip
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("request_timeout", "header_timeout", "body_timeout", "shutdown_timeout", "image_fetch_timeout"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be above 0")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError("torch_threads must be at least 1")
        if self.batch_wait < 0:
            raise ValueError("batch_wait must be >= 0")
        self.default_prompt(True)
        self.default_prompt(False)

    @property
    def query_model_names(self) -> tuple[str, ...]:
        """The names whose requests are queries: each model name with ``query_model_suffix``."""
        return tuple(name + self.query_model_suffix for name in self.model_names) if self.query_model_suffix else ()

    @property
    def served_names(self) -> tuple[str, ...]:
        """Every name a request may give as its ``model`` (``/v1/models`` lists them)."""
        return self.model_names + self.query_model_names

    def model_threads(self, device_type: str) -> int | None:
        """The torch threads to set for a model on ``device_type`` (None: leave torch's setting)."""
        if self.torch_threads is not None:
            return self.torch_threads
        if device_type != "cpu":
            return None
        cores = available_cores()
        return max(1, cores - min(self.input_workers, cores // 2))

    def default_prompt(self, reason: bool) -> str:
        """The instruction put before a query's (``reason``) or a document's text when a request names none."""
        if reason:
            return resolve_prompt(self.query_prompt, self.query_prompt_name, True)
        return resolve_prompt(self.document_prompt, self.document_prompt_name, False)
