"""``rge serve``: an OpenAI-compatible embeddings server whose queries reason together in one running batch.

Needs the ``serve`` extra (``pip install "rge-embeddings[serve]"``; without it ``create_app`` raises
``rge.errors.RGEMissingExtraError`` with that command). ``ServerSettings`` imports without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import require_extra
from .settings import ServerSettings

if TYPE_CHECKING:
    from .app import create_app

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":  # imported when used: it needs the serve extra
        for module in ("fastapi", "prometheus_client"):
            require_extra(module, extra="serve", needed_by="rge.serving.create_app")
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
