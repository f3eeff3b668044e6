"""Device memory after an out-of-memory error."""

from __future__ import annotations

import torch


def release_memory() -> None:
    """Return cached blocks to the device after an out-of-memory error, before retrying smaller."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
