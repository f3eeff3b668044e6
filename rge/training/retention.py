"""Which checkpoints a run keeps: the newest ``save_total_limit`` ones, the best one on
``metric_for_best_model`` (recorded in ``OUTPUT/trainer_state.json``) and the one the run resumed from.

A checkpoint's metrics are those of the evaluation at its step, kept in its ``state.json``; the best is
found among the checkpoints in the folder (ties: the earlier one), and is never deleted, so it stays the
best of the whole run.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..storage import atomic_write_json
from .checkpoints import complete_checkpoints, read_state
from .config import TrainingConfig

TRAINER_STATE_FILE = "trainer_state.json"


@dataclass(frozen=True)
class BestCheckpoint:
    path: Path
    step: int
    value: float


def best_checkpoint(output: Path, metric: str, *, greater_is_better: bool) -> BestCheckpoint | None:
    """The checkpoint under ``output`` whose evaluation scored best on ``metric`` (None: none was evaluated)."""
    best = None
    for path in complete_checkpoints(output):
        state = read_state(path)
        value = state.metrics.get(metric)
        if value is None or math.isnan(value):
            continue
        if best is None or (value > best.value if greater_is_better else value < best.value):
            best = BestCheckpoint(path, state.step, value)
    return best


def keep_checkpoints(output: Path, config: TrainingConfig, resumed_from: Path | None) -> BestCheckpoint | None:
    """After a checkpoint is saved: record the best one (with ``metric_for_best_model``) in
    ``trainer_state.json``, then delete the checkpoints past ``save_total_limit``; returns the best."""
    best = None
    if config.metric_for_best_model is not None:
        best = best_checkpoint(output, config.metric_for_best_model, greater_is_better=bool(config.greater_is_better))
        atomic_write_json(output / TRAINER_STATE_FILE, {
            "metric_for_best_model": config.metric_for_best_model, "greater_is_better": config.greater_is_better,
            "best_checkpoint": best.path.name if best else None, "best_step": best.step if best else None,
            "best_metric": best.value if best else None,
        })  # fmt: skip
    if config.save_total_limit is not None:
        protected = {path.name for path in (best.path if best else None, resumed_from) if path is not None}
        prune_checkpoints(output, config.save_total_limit, protected)
    return best


def prune_checkpoints(output: Path, limit: int, protected: set[str]) -> list[Path]:
    """Delete the complete checkpoints older than the newest ``limit``, except those named in ``protected``."""
    found = complete_checkpoints(output)
    removed = [path for path in found[: max(len(found) - limit, 0)] if path.name not in protected]
    for path in removed:
        shutil.rmtree(path)
    return removed
