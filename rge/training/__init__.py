"""The building blocks of RGE's training objective: the joint loss (exact across DDP processes) and the
LM branch's training sequences. ``rge train`` (the loop, data readers, checkpoints) is not there yet."""

from __future__ import annotations

from .collation import TrainingSequence, candidate_sequence, collate_training, query_sequence
from .losses import DEFAULT_TEMPERATURE, IGNORE_INDEX, JointLoss, info_nce, joint_loss, language_model_loss

__all__ = [
    "DEFAULT_TEMPERATURE",
    "IGNORE_INDEX",
    "JointLoss",
    "TrainingSequence",
    "candidate_sequence",
    "collate_training",
    "info_nce",
    "joint_loss",
    "language_model_loss",
    "query_sequence",
]
