"""The optimiser of a run (``--optim``), and the state it keeps per trained parameter.

- ``adamw``: torch's AdamW, two float32 moments: 8 bytes per parameter.
- ``adamw_8bit``: bitsandbytes' AdamW8bit, the same update with both moments quantised blockwise to 8 bits
  (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022): about 2 bytes per parameter.
  Tensors under 4,096 elements (norms, biases) keep float32 moments, as bitsandbytes decides. Needs the
  ``train-8bit`` extra.
- ``adafactor``: transformers' Adafactor (Shazeer and Stern, 2018) without a first moment, its second moment
  factored into a row and a column vector per matrix: a few bytes per row and column, not per parameter.
  It runs with the run's learning rate and scheduler (``relative_step=False``, ``scale_parameter=False``,
  ``warmup_init=False``), keeping its update clipping.

Every one saves its state with ``state_dict`` and takes it back with ``load_state_dict``, so checkpoints
resume with any of them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..errors import TrainingSetupError, require_extra
from .config import TrainingConfig

_NOISY_LOGGER = "bitsandbytes.backends.cpu.ops"
_NOISY_MESSAGE = "Failed to load CPU gemm_4bit_forward"
"""bitsandbytes warns at import, on a CPU without its optional ``kernels`` package, about a 4-bit kernel
that neither training nor peft's LoRA uses."""


def build_optimizer(config: TrainingConfig, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``config.optim`` over ``parameters``, with its learning rate and weight decay."""
    parameters = list(parameters)
    rate, decay = config.learning_rate, config.weight_decay
    if config.optim == "adamw":
        return torch.optim.AdamW(parameters, lr=rate, weight_decay=decay)
    if config.optim == "adamw_8bit":
        optimizer: torch.optim.Optimizer = import_bitsandbytes().optim.AdamW8bit(parameters, lr=rate,
                                                                                 weight_decay=decay)  # fmt: skip
        return optimizer
    from transformers.optimization import Adafactor  # "adafactor": TrainingConfig checked the name

    return Adafactor(parameters, lr=rate, weight_decay=decay, scale_parameter=False, relative_step=False,
                     warmup_init=False)  # fmt: skip


def require_optimizer(config: TrainingConfig) -> None:
    """Import what ``config.optim`` needs now, before a model is loaded (RGEMissingExtraError when missing)."""
    if config.optim == "adamw_8bit":
        import_bitsandbytes()


def check_same_optimizer(path: Path, saved: dict[str, Any], config: TrainingConfig) -> None:
    """TrainingSetupError when the checkpoint at ``path`` holds another optimiser's state than ``config``'s."""
    before = saved.get("optim", "adamw")  # checkpoints from before --optim were AdamW's
    if before != config.optim:
        raise TrainingSetupError(
            f"cannot resume {path}: it holds {before}'s optimiser state, this run uses {config.optim} "
            f"(resume with --optim {before})"
        )


def import_bitsandbytes() -> ModuleType:
    """bitsandbytes (the ``train-8bit`` extra), without its import-time line about an unused 4-bit kernel."""
    with quiet_bitsandbytes():
        return require_extra("bitsandbytes", extra="train-8bit", needed_by="--optim adamw_8bit")


@contextlib.contextmanager
def quiet_bitsandbytes() -> Iterator[None]:
    """While importing what may import bitsandbytes (it, or peft, which imports it when installed): its
    warning about the 4-bit CPU kernel is dropped; everything else it logs passes."""
    logger = logging.getLogger(_NOISY_LOGGER)

    def drop(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOISY_MESSAGE)

    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
