"""``rge serve``: an OpenAI-compatible embeddings server whose queries reason together in one running batch.

Needs the ``serve`` extra (``pip install "rge-embeddings[serve]"``).
"""

from __future__ import annotations

from .app import create_app
from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
