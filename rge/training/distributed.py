"""Collectives for the joint loss across processes (torchrun / accelerate DDP), no-ops in one process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """All processes' ``local`` rows concatenated in rank order; this process's rows keep their gradient.

    Every process must give the same number of rows (checked: a mismatch would pair the wrong rows).
    """
    if world_size() == 1:
        return local
    sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], device=local.device))
    if len({int(size) for size in sizes}) != 1:
        raise ValueError(f"every process needs the same batch size to gather embeddings, got {[int(s) for s in sizes]}")
    gathered = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(gathered, local.detach().contiguous())
    gathered[rank()] = local
    return torch.cat(gathered)


def sum_over_processes(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over all processes (a copy; no gradient flows through other processes)."""
    if world_size() == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total
