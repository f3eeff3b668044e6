"""Resumable training checkpoints, and the final model as a checkpoint ``RGEEncoder`` loads.

``OUTPUT/checkpoint-STEP/`` holds the trainable weights (every weight in full fine-tuning, the adapter
in LoRA), the optimiser and scheduler states (and the float16 gradient scaler's), each process's RNG
states, and ``state.json`` (step, data position, settings, and the metrics of an evaluation at that
step). A checkpoint is written under a temporary name and renamed when complete, so a crash while
saving leaves the previous one as the latest.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..loading import transformers_progress_bars
from ..storage import atomic_write_json, follow_umask
from .batches import DataPosition
from .distributed import barrier, rank
from .random_state import RandomState
from .sharding import full_optimizer_state, full_weights, is_sharded, load_full_optimizer_state, load_full_weights

WEIGHTS_FILE = "trainable.safetensors"
STATE_FILE = "state.json"
SCALER_FILE = "scaler.pt"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
_MODEL_FILES = ("config.json", "model.safetensors.index.json")


@dataclass
class TrainingState:
    step: int
    position: DataPosition
    settings: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    """The evaluation at this step (``eval/...``; empty when there was none)."""


def checkpoint_dir(output: Path, step: int) -> Path:
    return output / f"checkpoint-{step}"


def complete_checkpoints(output: Path) -> list[Path]:
    """The complete checkpoints under ``output``, oldest (lowest step) first."""
    found = [path for path in output.glob("checkpoint-*") if (path / STATE_FILE).is_file()]
    found = [path for path in found if path.name.removeprefix("checkpoint-").isdigit()]
    return sorted(found, key=lambda path: int(path.name.removeprefix("checkpoint-")))


def latest_checkpoint(output: Path) -> Path | None:
    """The complete checkpoint with the highest step under ``output``, or None."""
    found = complete_checkpoints(output)
    return found[-1] if found else None


def save_checkpoint(
    output: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: TrainingState, scaler: Any = None
) -> Path:
    """Write ``checkpoint-STEP`` (every process calls this: each writes its RNG states)."""
    final = checkpoint_dir(output, state.step)
    partial = final.with_name(final.name + ".partial")
    if rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    torch.save(RandomState.capture().to_dict(), partial / f"rng-{rank()}.pt")
    weights, optimizer_state = _saved_states(model, optimizer)
    if rank() == 0:
        save_file(weights, partial / WEIGHTS_FILE)
        follow_umask(partial / WEIGHTS_FILE)
        torch.save(optimizer_state, partial / "optimizer.pt")
        torch.save(scheduler.state_dict(), partial / "scheduler.pt")
        if scaler is not None and scaler.is_enabled():
            torch.save(scaler.state_dict(), partial / SCALER_FILE)
    barrier()
    if rank() == 0:
        position = {"epoch": state.position.epoch, "batch": state.position.batch}
        saved = {"step": state.step, **position, "settings": state.settings}
        atomic_write_json(partial / STATE_FILE, {**saved, "metrics": state.metrics} if state.metrics else saved)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    barrier()
    return final


def _saved_states(model: torch.nn.Module, optimizer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainable weights (full CPU tensors) and the optimiser state a checkpoint holds: gathered from
    every process's shards for a sharded model (every process calls this), the main process's own else."""
    if is_sharded(model):
        return full_weights(model, set(trainable(model))), full_optimizer_state(model, optimizer)
    if rank() != 0:
        return {}, {}
    return {name: p.detach().cpu().contiguous() for name, p in trainable(model).items()}, optimizer.state_dict()


def read_state(path: Path) -> TrainingState:
    """A checkpoint's step, data position, the settings it was written with and its evaluation's metrics."""
    saved = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    position = DataPosition(saved["epoch"], saved["batch"])
    return TrainingState(saved["step"], position, saved["settings"], saved.get("metrics", {}))


def restore_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, scaler: Any = None) -> None:
    """Put what ``save_checkpoint`` wrote back into ``model``, ``optimizer``, ``scheduler``, ``scaler`` (when
    the checkpoint has its state) and the RNGs."""
    restore_weights(path, model)
    if is_sharded(model):  # the main process reads the full state, every process takes its shard
        saved = torch.load(path / "optimizer.pt", weights_only=True) if rank() == 0 else {}
        load_full_optimizer_state(model, optimizer, saved)
    else:
        device = next(iter(trainable(model).values())).device
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if scaler is not None and scaler.is_enabled() and (path / SCALER_FILE).is_file():
        scaler.load_state_dict(torch.load(path / SCALER_FILE, weights_only=True))
    rng_file = path / f"rng-{rank()}.pt"
    if not rng_file.is_file():
        raise ValueError(f"{path} was written by fewer processes (no {rng_file.name}); resume with as many")
    RandomState.from_dict(torch.load(rng_file, weights_only=False)).restore()


def restore_weights(path: Path, model: torch.nn.Module) -> None:
    """Put a checkpoint's trainable weights back into ``model`` (ValueError: saved for other trainable weights;
    every process of a sharded model calls this)."""
    parameters = trainable(model)
    with safe_open(path / WEIGHTS_FILE, framework="pt") as saved:
        names = set(saved.keys())
    if names != set(parameters):
        differ = sorted(names ^ set(parameters))[:4]
        raise ValueError(f"{path} was saved for other trainable weights (LoRA settings changed?): {differ}")
    if is_sharded(model):
        load_full_weights(model, load_file(path / WEIGHTS_FILE) if rank() == 0 else {})
        return
    weights = load_file(path / WEIGHTS_FILE)
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(weights[name])


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


def export_model(model: Any, source: Path, output: Path, *, tokenizer: Any = None) -> None:
    """Save ``model`` (a PEFT model is merged first, in float32) with ``source``'s tokenizer, processor, chat
    template and generation config, in ``source``'s weight dtype: a checkpoint ``RGEEncoder`` loads directly.
    ``tokenizer`` (a base model's with ``<emb>`` added) is saved over the source's tokenizer files."""
    if hasattr(model, "merge_and_unload"):  # in float32: bfloat16 frozen weights plus the adapter, rounded once
        model = model.to(torch.float32).merge_and_unload()
    model.to(_saved_dtype(source))
    output.mkdir(parents=True, exist_ok=True)
    with transformers_progress_bars(show=False):  # a bar for a shard or two, under the run's own bar
        model.save_pretrained(output)
    for file in source.iterdir():
        if file.is_file() and file.name not in _MODEL_FILES and not file.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copyfile(file, output / file.name)
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    follow_umask(output)


def _saved_dtype(source: Path) -> torch.dtype:
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    name = config.get("torch_dtype") or config.get("dtype") or config.get("text_config", {}).get("dtype")
    dtype = getattr(torch, str(name), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
