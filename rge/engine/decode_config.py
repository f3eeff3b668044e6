"""What a decode is asked to do, fixed for its lifetime, and how it picks each row's next token."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .decoding_settings import GenerationSettings


@dataclass(frozen=True)
class DecodeConfig:
    """A decode's settings: ``<emb>`` ends a row, ``max_new_tokens`` bounds it, ``batch_size`` rows run
    together. With ``admission``, waiting queries join the running batch once ``admit_fraction`` of it is
    free; queries admitted together are prefilled in groups that spend at most ``max_padding`` of their
    tokens on padding."""

    emb_token_id: int
    max_new_tokens: int
    batch_size: int
    generation: GenerationSettings
    admission: bool = True
    admit_fraction: float = 0.25
    max_padding: float = 0.25

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def admit_at(self, rows: int) -> int:
        """Free rows (of ``rows``) at which waiting queries are admitted into a running batch."""
        return max(1, int(rows * self.admit_fraction))

    @property
    def penalizes(self) -> bool:
        return self.generation.repetition_penalty != 1.0


class TokenChoice(Protocol):
    """How each row's next token is chosen from its scores (float32 logits after the penalty).

    It runs inside a captured decode step on CUDA: tensor operations only, no reading back to the host.
    """

    def admit(self, rows: Sequence[int], keys: Sequence[Hashable]) -> None:
        """The queries ``keys`` now decode in output rows ``rows``."""
        ...

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The next token of each row: ``scores`` (R, vocab), the rows' output rows and token counts (R,)."""
        ...


class Greedy:
    """The arg-max: what the checkpoint's generation config asks for (``decoding_settings.py``)."""

    def admit(self, rows: Sequence[int], keys: Sequence[Hashable]) -> None:
        """Greedy choice needs nothing of the queries."""

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return scores.argmax(dim=-1)


GREEDY = Greedy()
