"""Fine-tuning RGE with the paper's joint objective: ``train(TrainingConfig(...))`` or ``rge train``.

The pieces for people who want their own loop: ``read_training_data`` (rows in rge's or MMEB-train's
layout), ``epoch_plan`` (task-homogeneous batches), ``build_step_batch`` (self-generated rationales and
the three lists of sequences), ``backward_step`` (the joint loss's backward, GradCache below the batch
size), and the losses themselves (exact across DDP processes). ``load_training_encoder`` loads an RGE
checkpoint, or a base Qwen2.5-VL-Instruct one with ``<emb>`` added (``add_emb_token``, ``add_emb_row``);
``training_precision`` says how the passes compute for a ``--dtype`` and device.
"""

from __future__ import annotations

from .base_model import add_emb_row, add_emb_token, load_training_encoder
from .batches import DataPosition, epoch_plan, process_slice
from .collation import TrainingSequence, candidate_sequence, collate_training, query_sequence
from .config import TrainingConfig
from .data import Side, TrainingDataError, TrainingExample, read_training_data
from .losses import DEFAULT_TEMPERATURE, IGNORE_INDEX, JointLoss, info_nce, joint_loss, language_model_loss
from .precision import Precision, training_precision
from .step import EmbeddingModule, StepBatch, backward_step, build_step_batch, collate_pass
from .trainer import Trainer, TrainingSetupError, train

__all__ = [
    "DEFAULT_TEMPERATURE",
    "IGNORE_INDEX",
    "DataPosition",
    "EmbeddingModule",
    "JointLoss",
    "Precision",
    "Side",
    "StepBatch",
    "Trainer",
    "TrainingConfig",
    "TrainingDataError",
    "TrainingExample",
    "TrainingSequence",
    "TrainingSetupError",
    "add_emb_row",
    "add_emb_token",
    "backward_step",
    "build_step_batch",
    "candidate_sequence",
    "collate_pass",
    "collate_training",
    "epoch_plan",
    "info_nce",
    "joint_loss",
    "language_model_loss",
    "load_training_encoder",
    "process_slice",
    "query_sequence",
    "read_training_data",
    "train",
    "training_precision",
]
