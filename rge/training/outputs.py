"""A run's output folder: what an earlier run left there (resumed, refused, or cleared on request), the
per-step log (``log.jsonl``, and TensorBoard or W&B), and the console's word on skipped rows (``errors.jsonl``)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from .._about import DISTRIBUTION
from ..bad_rows import ERROR_FILE
from ..errors import TrainingSetupError, require_extra
from .checkpoints import TrainingState, latest_checkpoint
from .distributed import barrier, rank
from .retention import TRAINER_STATE_FILE

LOG_FILE = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"
EARLIER_RUN_FILES = (LOG_FILE, "config.json")
"""Files that say a run trained (or saved a model) into the folder before."""
REPORTER_MODULES = {"tensorboard": ("tensorboard", "train"), "wandb": ("wandb", "wandb")}
"""What each ``report_to`` name needs: the module, and the extra that installs it."""

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
    (output / TRAINER_STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(output / TENSORBOARD_DIR, ignore_errors=True)


def report_skipped(output: Path) -> None:
    """One console line (a warning of the ``rge.training`` logger) when ``errors.jsonl`` lists rows."""
    path = output / ERROR_FILE
    count = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line) if path.is_file() else 0
    if count:
        logger.warning("%d skipped row%s listed in %s", count, "" if count == 1 else "s", path)


def require_reporters(report_to: list[str] | None) -> None:
    """RGEMissingExtraError (its line the ``pip install`` command) for a ``report_to`` name not installed."""
    for name in report_to or ():
        module, extra = REPORTER_MODULES[name]
        require_extra(module, extra=extra, needed_by=f"--report-to {name}")


class RunLog:
    """``log.jsonl`` (one line per logged step, and one per evaluation) and TensorBoard or W&B, on the main
    process. ``report_to`` None: TensorBoard when it is installed and ``tensorboard`` is True.

    A resumed run first drops what the log holds past its checkpoint (steps an interrupted run logged
    but did not save), so the steps of ``log.jsonl`` always increase.
    """

    def __init__(
        self,
        output: Path,
        *,
        main: bool,
        tensorboard: bool = True,
        report_to: list[str] | None = None,
        resumed_step: int = 0,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.path = output / LOG_FILE
        self.main, self.resumed_step, self.settings = main, resumed_step, settings or {}
        self.report_to = report_to if report_to is not None else (["tensorboard"] if tensorboard else [])
        self.tensorboard_optional = report_to is None
        self.writer: Any = None
        self.wandb: Any = None

    def __enter__(self) -> RunLog:
        if self.main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.resumed_step and self.path.is_file():
                kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                        if line and json.loads(line)["step"] <= self.resumed_step]  # fmt: skip
                self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            if "tensorboard" in self.report_to:
                self.writer = self._tensorboard()
            if "wandb" in self.report_to:
                wandb = require_extra("wandb", extra="wandb", needed_by="--report-to wandb")
                self.wandb = wandb.init(dir=str(self.path.parent), name=self.path.parent.name, config=self.settings)
        return self

    def _tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if not self.tensorboard_optional:
                raise
            logger.warning('TensorBoard is not installed: logging to %s only (pip install "%s[train]" for '
                           "TensorBoard; --no-tensorboard or tensorboard=False hides this line)", LOG_FILE,
                           DISTRIBUTION)  # fmt: skip
            return None
        # purge_step hides the events an interrupted run wrote past the checkpoint
        purge = self.resumed_step + 1 if self.resumed_step else None
        return SummaryWriter(str(self.path.parent / TENSORBOARD_DIR), purge_step=purge)

    def write(self, state: TrainingState, values: dict[str, float], facts: dict[str, Any]) -> None:
        """A training step's line; TensorBoard and W&B get its numbers as ``train/NAME``."""
        record = self._line(state, {**values, **facts})
        self._scalars(state, {f"train/{name}": value for name, value in record.items() if name != "step"})

    def write_eval(self, state: TrainingState, metrics: dict[str, float]) -> None:
        """An evaluation's line (its ``eval/...`` metrics, no ``loss``); TensorBoard and W&B get them as named."""
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
        if self.wandb is not None:
            self.wandb.log(numbers, step=state.step)

    def __exit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
