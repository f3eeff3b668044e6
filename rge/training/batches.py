"""Which examples form each step's batch: task-homogeneous by default, reproducible from (seed, epoch).

Every process computes the same plan and takes its own contiguous slice of each global batch, so the
data position of a run is just (epoch, batch number) and a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from .data import TrainingExample

Item = TypeVar("Item")


@dataclass(frozen=True)
class DataPosition:
    """How far a run has read: the epoch and the number of its batches already trained on."""

    epoch: int = 0
    batch: int = 0


def epoch_plan(
    examples: Sequence[TrainingExample], global_batch_size: int, *, seed: int, epoch: int, mix_tasks: bool = False
) -> list[list[int]]:
    """The epoch's global batches as example indices.

    Task-homogeneous (the authors' scheme): each task's examples are shuffled and cut into batches; a
    task's last, short batch is filled with its own examples from the start of the shuffled order
    (so every batch is full and holds one task only, as the authors pad); then the batches are shuffled.
    ``mix_tasks=True`` shuffles all examples together instead (the last short batch filled the same way).
    """
    rng = random.Random(f"{seed}:{epoch}")
    groups: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault("" if mix_tasks else example.task, []).append(index)
    batches: list[list[int]] = []
    for task in sorted(groups):
        members = groups[task]
        rng.shuffle(members)
        batches.extend(_cut(members, global_batch_size))
    rng.shuffle(batches)
    return batches


def _cut(members: list[int], size: int) -> list[list[int]]:
    batches = [members[start : start + size] for start in range(0, len(members), size)]
    short = size - len(batches[-1])
    if short:
        filler = (members * (short // len(members) + 1))[:short]
        batches[-1] = batches[-1] + filler
    return batches


def process_slice(global_batch: Sequence[Item], rank: int, world_size: int) -> list[Item]:
    """This process's contiguous share of a global batch (rank order = the order of the gathered batch)."""
    per_process = len(global_batch) // world_size
    return list(global_batch[rank * per_process : (rank + 1) * per_process])
