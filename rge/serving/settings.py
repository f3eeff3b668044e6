"""What an operator sets for ``rge serve``: limits, security and batching, with safe defaults."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServerSettings:
    """Limits, security and batching of one server (one engine).

    Every limit is enforced before the request reaches the engine, except ``request_timeout`` (which
    drops the request's unfinished items from the running batch when it expires).
    """

    model_names: tuple[str, ...] = ("rge",)
    """Names the server answers to; requests naming another model get 404 (the first one is reported)."""
    api_key: str | None = None
    """When set, every route but ``/health`` needs ``Authorization: Bearer <api_key>``."""
    batch_size: int = 32
    """Queries decoded together (the running batch) and documents per forward pass."""
    batch_wait: float = 0.005
    """Seconds a document waits for others to share its forward pass (unless a full batch is waiting)."""
    max_queued_items: int = 1024
    """Items accepted and not yet finished, over all requests; beyond it, 429 with ``Retry-After``."""
    max_items_per_request: int = 256
    max_body_bytes: int = 32 * 2**20
    max_image_pixels: int = 6000 * 6000
    """Largest decoded image (width x height) accepted, checked before the pixels are decoded."""
    request_timeout: float = 300.0
    """Seconds a request may take; then 504, and its unfinished items leave the batch."""
    image_hosts: tuple[str, ...] = ()
    """Hosts whose ``http(s)`` image URLs are fetched (exact names, or ``.example.com`` for subdomains).
    Empty: URLs are refused."""
    private_image_hosts: bool = False
    """Allow allow-listed hosts that resolve to private, loopback or link-local addresses."""
    image_fetch_timeout: float = 10.0
    image_fetch_max_bytes: int = 20 * 2**20
    retry_after: int = 1
    """Seconds a 429 or 503 answer asks the client to wait."""
    extra: dict[str, object] = field(default_factory=dict)
    """Free-form facts shown on ``/v1/models`` (the checkpoint's revision, the pixel budget...)."""

    def __post_init__(self) -> None:
        if not self.model_names:
            raise ValueError("a server needs at least one model name")
        for name in ("batch_size", "max_queued_items", "max_items_per_request", "max_body_bytes",
                     "max_image_pixels", "image_fetch_max_bytes"):  # fmt: skip
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("request_timeout", "image_fetch_timeout"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be above 0")
        if self.batch_wait < 0:
            raise ValueError("batch_wait must be >= 0")
