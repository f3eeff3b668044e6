"""Fine-tuning RGE with the paper's joint objective: ``train(TrainingConfig(...))`` or ``rge train``.

The pieces for people who want their own loop: ``read_training_data`` (rows in rge's or MMEB-train's
layout), ``epoch_plan`` (task-homogeneous batches), ``build_step_batch`` (self-generated rationales and
the three lists of sequences), ``backward_step`` (the joint loss's backward, GradCache below the batch
size), and the losses themselves (exact across DDP processes).

Each name is imported on first use, so that ``TrainingConfig`` (which ``rge train --help`` reads its
defaults from) comes without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..errors import TrainingDataError, TrainingSetupError
    from .batches import DataPosition, epoch_plan, process_slice
    from .collation import TrainingSequence, candidate_sequence, collate_training, query_sequence
    from .config import DEFAULT_TEMPERATURE, TrainingConfig
    from .data import Side, TrainingExample, read_training_data
    from .losses import IGNORE_INDEX, JointLoss, info_nce, joint_loss, language_model_loss
    from .step import EmbeddingModule, StepBatch, backward_step, build_step_batch, collate_pass
    from .trainer import Trainer, train

_MODULES = {
    "..errors": ("TrainingDataError", "TrainingSetupError"),
    ".batches": ("DataPosition", "epoch_plan", "process_slice"),
    ".collation": ("TrainingSequence", "candidate_sequence", "collate_training", "query_sequence"),
    ".config": ("DEFAULT_TEMPERATURE", "TrainingConfig"),
    ".data": ("Side", "TrainingExample", "read_training_data"),
    ".losses": ("IGNORE_INDEX", "JointLoss", "info_nce", "joint_loss", "language_model_loss"),
    ".step": ("EmbeddingModule", "StepBatch", "backward_step", "build_step_batch", "collate_pass"),
    ".trainer": ("Trainer", "train"),
}
_LAZY = {name: module for module, names in _MODULES.items() for name in names}

__all__ = [
    "DEFAULT_TEMPERATURE",
    "IGNORE_INDEX",
    "DataPosition",
    "EmbeddingModule",
    "JointLoss",
    "Side",
    "StepBatch",
    "Trainer",
    "TrainingConfig",
    "TrainingDataError",
    "TrainingExample",
    "TrainingSequence",
    "TrainingSetupError",
    "backward_step",
    "build_step_batch",
    "candidate_sequence",
    "collate_pass",
    "collate_training",
    "epoch_plan",
    "info_nce",
    "joint_loss",
    "language_model_loss",
    "process_slice",
    "query_sequence",
    "read_training_data",
    "train",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
