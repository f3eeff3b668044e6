"""Exceptions raised by rge."""

from __future__ import annotations


class RGEInputError(ValueError):
    """An input item cannot be encoded. The message names the item index and the problem.

    Raised before any model work, so the encoder stays usable after it.
    """

    def __init__(self, message: str, index: int | None = None, part: str | None = None) -> None:
        self.index = index
        """The item at fault (None when the call as a whole is)."""
        self.part = part
        """The part of the item at fault, when it is one part: ``"image"``."""
        self.reason = message
        """The message without the item prefix."""
        super().__init__(message if index is None else f"item {index}: {message}")


class RGECheckpointError(ValueError):
    """A checkpoint cannot be used as an RGE model (missing files, no ``<emb>`` token, ...)."""
