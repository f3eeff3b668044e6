"""The random generators' state of this process, captured and put back: a checkpoint saves it so a resumed
run draws what an uninterrupted one would, and GradCache replays a micro-batch's dropout with it."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class RandomState:
    """Python's, NumPy's and torch's generators (the CPU one, and each CUDA device's when there are any)."""

    python: Any
    numpy: Any
    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None

    @classmethod
    def capture(cls) -> RandomState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        return cls(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.cuda)

    def to_dict(self) -> dict[str, Any]:
        """The states under the names a checkpoint's ``rng-RANK.pt`` keeps them."""
        return {"python": self.python, "numpy": self.numpy, "torch": self.cpu, "cuda": self.cuda}

    @classmethod
    def from_dict(cls, states: dict[str, Any]) -> RandomState:
        return cls(states["python"], states["numpy"], states["torch"], states["cuda"])
