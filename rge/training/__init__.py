"""Fine-tuning RGE with the paper's joint objective: ``train(TrainingConfig(...))`` or ``rge train``.

The pieces for people who want their own loop: ``read_training_data`` (rows in rge's or MMEB-train's
layout), ``open_mmeb_train`` (a local MMEB-train snapshot, streamed), ``epoch_plan`` (task-homogeneous
batches), ``build_step_batch`` (self-generated rationales and the three lists of sequences),
``backward_step`` (the joint loss's backward, GradCache below the batch size), and the losses themselves
(exact across DDP processes). ``load_training_encoder`` loads an RGE checkpoint, or a base
Qwen2.5-VL-Instruct one with ``<emb>`` added (``add_emb_token``, ``add_emb_row``); ``training_precision``
says how the passes compute for a ``--dtype`` and device; ``evaluate_retrieval`` is
the held-out evaluation ``--eval-data`` runs (Recall@1, NDCG@10 with and without reasoning, rationale lengths).

Each name is imported on first use, so that ``TrainingConfig`` (which ``rge train --help`` reads its
defaults from) comes without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from ..errors import TrainingDataError, TrainingSetupError
    from .base_model import add_emb_row, add_emb_token, load_training_encoder
    from .batches import DataPosition, epoch_plan, process_slice
    from .collation import TrainingSequence, candidate_sequence, collate_training, query_sequence
    from .config import DEFAULT_TEMPERATURE, TrainingConfig
    from .data import Side, TrainingExample, read_training_data
    from .evaluation import evaluate_retrieval
    from .losses import IGNORE_INDEX, JointLoss, info_nce, joint_loss, language_model_loss
    from .mmeb_train import MMEBTrainStream, open_mmeb_train
    from .precision import Precision, training_precision
    from .step import EmbeddingModule, StepBatch, backward_step, build_step_batch, collate_pass
    from .trainer import Trainer, train

_MODULES = {
    "..errors": ("TrainingDataError", "TrainingSetupError"),
    ".base_model": ("add_emb_row", "add_emb_token", "load_training_encoder"),
    ".batches": ("DataPosition", "epoch_plan", "process_slice"),
    ".collation": ("TrainingSequence", "candidate_sequence", "collate_training", "query_sequence"),
    ".config": ("DEFAULT_TEMPERATURE", "TrainingConfig"),
    ".data": ("Side", "TrainingExample", "read_training_data"),
    ".evaluation": ("evaluate_retrieval",),
    ".losses": ("IGNORE_INDEX", "JointLoss", "info_nce", "joint_loss", "language_model_loss"),
    ".mmeb_train": ("MMEBTrainStream", "open_mmeb_train"),
    ".precision": ("Precision", "training_precision"),
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
    "MMEBTrainStream",
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
    "evaluate_retrieval",
    "info_nce",
    "joint_loss",
    "language_model_loss",
    "load_training_encoder",
    "open_mmeb_train",
    "process_slice",
    "query_sequence",
    "read_training_data",
    "train",
    "training_precision",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
