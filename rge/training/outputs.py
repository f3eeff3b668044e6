"""A run's output folder: what an earlier run left there (resumed, refused, or cleared on request), the
per-step log (``log.jsonl`` and TensorBoard), and the console's word on skipped rows (``errors.jsonl``)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from .._about import DISTRIBUTION
from ..errors import TrainingSetupError
from .checkpoints import TrainingState, latest_checkpoint
from .distributed import barrier, rank

LOG_FILE = "log.jsonl"
ERROR_FILE = "errors.jsonl"
TENSORBOARD_DIR = "tensorboard"
EARLIER_RUN_FILES = (LOG_FILE, "config.json")
"""Files that say a run trained (or saved a model) into the folder before."""

logger = logging.getLogger("rge.training")


def check_output(output: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint a run into ``output`` continues from (None: it starts afresh).

    An earlier run's checkpoints are continued with ``resume``; without it, or when the earlier run left
    a model or a log but no checkpoint, the run is refused (TrainingSetupError) rather than overwrite
    that model or append to that log. ``overwrite`` starts afresh: the earlier run's checkpoints, log and
    TensorBoard files are removed (its model is replaced at the end).
    """
    if output.exists() and not output.is_dir():
        raise TrainingSetupError(f"output {str(output)!r} is a file; give a folder")
    if not output.is_dir():
        return None
    if overwrite:
        if rank() == 0:
            _clear_earlier_run(output)
        barrier()
        return None
    latest = latest_checkpoint(output)
    if latest is not None:
        if resume:
            return latest
        raise TrainingSetupError(
            f"{str(output)!r} holds {latest.name} from an earlier run: pass --resume to continue it, "
            "--overwrite-output-dir to start again, or choose another output folder"
        )
    earlier = [name for name in EARLIER_RUN_FILES if (output / name).exists()]
    if earlier:
        raise TrainingSetupError(
            f"{str(output)!r} holds an earlier run ({', '.join(earlier)}) and no checkpoint to resume from: "
            "pass --overwrite-output-dir to replace it, or choose another output folder"
        )
    return None


def _clear_earlier_run(output: Path) -> None:
    for checkpoint in output.glob("checkpoint-*"):
        if checkpoint.is_dir():
            shutil.rmtree(checkpoint)
    (output / LOG_FILE).unlink(missing_ok=True)
    shutil.rmtree(output / TENSORBOARD_DIR, ignore_errors=True)


def report_skipped(output: Path) -> None:
    """One console line (a warning of the ``rge.training`` logger) when ``errors.jsonl`` lists rows."""
    path = output / ERROR_FILE
    count = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line) if path.is_file() else 0
    if count:
        logger.warning("%d skipped row%s listed in %s", count, "" if count == 1 else "s", path)


class RunLog:
    """``log.jsonl`` (one line per logged step, and one per evaluation) and, when installed, TensorBoard, on the
    main process.

    A resumed run first drops what the log holds past its checkpoint (steps an interrupted run logged
    but did not save), so the steps of ``log.jsonl`` always increase.
    """

    def __init__(self, output: Path, *, main: bool, tensorboard: bool, resumed_step: int = 0) -> None:
        self.path = output / LOG_FILE
        self.main, self.tensorboard, self.resumed_step = main, tensorboard, resumed_step
        self.writer: Any = None

    def __enter__(self) -> RunLog:
        if self.main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.resumed_step and self.path.is_file():
                kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                        if line and json.loads(line)["step"] <= self.resumed_step]  # fmt: skip
                self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            if self.tensorboard:
                self.writer = self._tensorboard()
        return self

    def _tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning('TensorBoard is not installed: logging to %s only (pip install "%s[train]" for '
                           "TensorBoard; --no-tensorboard or tensorboard=False hides this line)", LOG_FILE,
                           DISTRIBUTION)  # fmt: skip
            return None
        # purge_step hides the events an interrupted run wrote past the checkpoint
        purge = self.resumed_step + 1 if self.resumed_step else None
        return SummaryWriter(str(self.path.parent / TENSORBOARD_DIR), purge_step=purge)

    def write(self, state: TrainingState, values: dict[str, float], facts: dict[str, Any]) -> None:
        """A training step's line; TensorBoard gets its numbers as ``train/NAME``."""
        record = self._line(state, {**values, **facts})
        self._scalars(state, {f"train/{name}": value for name, value in record.items() if name != "step"})

    def write_eval(self, state: TrainingState, metrics: dict[str, float]) -> None:
        """An evaluation's line (its ``eval/...`` metrics, no ``loss``); TensorBoard gets them as named."""
        self._line(state, metrics)
        self._scalars(state, metrics)

    def _line(self, state: TrainingState, values: dict[str, Any]) -> dict[str, Any]:
        record = {"step": state.step, "epoch": state.position.epoch, **values}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        return record

    def _scalars(self, state: TrainingState, values: dict[str, Any]) -> None:
        numbers = {name: value for name, value in values.items() if isinstance(value, (int, float))}
        if self.writer is not None:
            for name, value in numbers.items():
                self.writer.add_scalar(name, value, state.step)

    def __exit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()
