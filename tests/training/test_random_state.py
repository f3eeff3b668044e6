"""One capture of the random generators serves checkpoints and GradCache's replayed forwards."""

from __future__ import annotations

import random

import numpy as np
import torch

from rge.training.random_state import RandomState


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_restore_replays_every_generator_and_survives_a_checkpoint_file(tmp_path):
    state = RandomState.capture()
    first = _draws()
    state.restore()
    assert _draws() == first
    torch.save(state.to_dict(), tmp_path / "rng-0.pt")
    assert set(torch.load(tmp_path / "rng-0.pt", weights_only=False)) == {"python", "numpy", "torch", "cuda"}
    RandomState.from_dict(torch.load(tmp_path / "rng-0.pt", weights_only=False)).restore()
    assert _draws() == first
