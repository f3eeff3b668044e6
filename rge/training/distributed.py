"""Collectives for the joint loss across processes (torchrun / accelerate DDP), no-ops in one process."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """All processes' ``local`` rows concatenated in rank order; this process's rows keep their gradient.

    Processes may hold different numbers of rows (hard negatives vary by example): rows are padded to
    the largest count for the collective and the padding is dropped again.
    """
    if world_size() == 1:
        return local
    counts = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([local.shape[0]], device=local.device))
    sizes = [int(count) for count in counts]
    padded = local.detach().new_zeros((max(sizes), *local.shape[1:]))
    padded[: local.shape[0]] = local.detach()
    gathered = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(gathered, padded.contiguous())
    parts = [part[:size] for part, size in zip(gathered, sizes)]
    parts[rank()] = local
    return torch.cat(parts)


def sum_over_processes(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over all processes (a copy; no gradient flows through other processes)."""
    if world_size() == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total


def max_over_processes(values: list[int], device: torch.device) -> list[int]:
    """Each of ``values`` replaced by its largest value over all processes."""
    if world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [int(value) for value in tensor.tolist()]


def barrier() -> None:
    """Wait for every process (no-op in one process)."""
    if world_size() > 1:
        dist.barrier()


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_environment(device: torch.device, timeout: float) -> bool:
    """Join the process group a launcher (``torchrun``, ``accelerate launch``) describes in the environment
    (``WORLD_SIZE`` > 1): NCCL on CUDA, gloo on CPU. A collective that waits longer than ``timeout`` seconds
    for another process raises in this one instead of waiting for ever. Returns whether this call created
    the group."""
    if launched_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return True
