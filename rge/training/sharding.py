"""Sharded data parallel (``--fsdp``): full fine-tuning with weights, gradients and optimiser state split
over the processes ``torchrun`` starts (FSDP2, ``torch.distributed.fsdp.fully_shard``).

Each text decoder layer is a unit of its own: its weights are gathered for its forward and backward and
split again after. The rest (embeddings, final norm, head and the vision tower) is the root unit, gathered
once per training forward; the vision tower stays there because a process whose batch has no image never
runs it, and a unit one process runs and another does not would leave the other waiting at its gather.
Gradients of weights a process did not use are reduced as zeros for the same reason.

Generation and evaluation run outside the training passes, a different number of forwards on each
process: ``gathered`` holds the whole model on every process while they run, so that no forward waits
for a peer. Checkpoints and the exported model hold full (unsharded) tensors, written by the main process.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from .distributed import rank

_SAVED = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""Full tensors on the main process's CPU (the others get none): what a checkpoint holds."""
_LOADED = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
"""Full tensors read by the main process only and sent to the others' shards."""


def shard(module: torch.nn.Module, model: Any) -> None:
    """Split ``module`` (the training module around ``model``) over the process group: a unit per text
    decoder layer, the rest in the root unit."""
    layers = list(model.model.language_model.layers)
    for layer in layers:
        fully_shard(layer)
    fully_shard(module)
    assert isinstance(module, FSDPModule)
    module.set_reduce_scatter_unused_params(True)
    # In the backward, each layer gathers the one before it (the first: the root, gathered already). Named
    # here, not left to FSDP's default, which takes the unit that ran the forward before it, and that can be
    # one of the main process's evaluation forwards, which the others did not run.
    for earlier, layer in zip([module, *layers[:-1]], layers, strict=True):
        layer.set_modules_to_backward_prefetch([earlier])
    with torch.no_grad():  # FSDP takes the first unit to run a forward for the root: the root runs one, empty,
        module([])  # before generation runs the layers alone
    module.reshard()  # the root keeps its weights gathered after a forward: the optimiser must get the shards


def is_sharded(module: torch.nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def units(module: torch.nn.Module) -> list[FSDPModule]:
    return [unit for unit in module.modules() if isinstance(unit, FSDPModule)]


@contextlib.contextmanager
def gathered(module: torch.nn.Module) -> Iterator[None]:
    """The whole model on every process (every process enters): forwards inside wait for no peer."""
    if not is_sharded(module):
        yield
        return
    sharded = units(module)
    layers = [unit for unit in sharded if unit is not module]  # the root keeps its weights after a forward
    for unit in sharded:
        unit.unshard()
    for unit in layers:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in layers:
            unit.set_reshard_after_forward(True, recurse=False)
        for unit in sharded:
            unit.reshard()


def full_weights(module: torch.nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """The weights ``names`` of a sharded ``module`` as full CPU tensors: on the main process (collective; the
    others get an empty dict)."""
    state: dict[str, Any] = get_model_state_dict(module, options=_SAVED)
    return {name: tensor.contiguous() for name, tensor in state.items() if name in names} if rank() == 0 else {}


def load_full_weights(module: torch.nn.Module, weights: dict[str, Any]) -> None:
    """Full ``weights`` (read by the main process; the others pass an empty dict) into ``module``'s shards."""
    set_model_state_dict(module, dict(weights), options=dataclasses.replace(_LOADED, strict=False))


def full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser state with full tensors, keyed by weight name (collective; the main process gets it)."""
    return get_optimizer_state_dict(module, optimizer, options=_SAVED)


def load_full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    set_optimizer_state_dict(module, optimizer, state, options=_LOADED)


def local_value(value: torch.Tensor) -> torch.Tensor:
    """A replicated result of sharded tensors (a gradient norm) as a plain tensor."""
    return value.full_tensor() if isinstance(value, DTensor) else value
