"""The precision of the training passes: float32, or autocast to bfloat16 (CUDA, CPU) or float16 (CUDA only,
with a gradient scaler). The weights that train and their gradients stay float32 in every case (frozen
weights may be stored in bfloat16 under LoRA: ``lora.py``; the optimiser state is ``optimizers.py``'s).

float16 has a narrow range: small gradients underflow to zero unless the loss is scaled up before the
backward and the gradients scaled down before the optimiser step (``torch.amp.GradScaler``, which also
skips a step whose gradients overflowed). bfloat16 has float32's range and needs no scaler.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import TrainingSetupError
from ..loading import choose_dtype


@dataclass(frozen=True)
class Precision:
    """How the passes of a run compute: ``dtype`` on ``device_type`` (float32: no autocast)."""

    dtype: torch.dtype
    device_type: str

    @property
    def scaled(self) -> bool:
        """Whether the loss is scaled for the backward (float16)."""
        return self.dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """The run's gradient scaler: active for float16, a pass-through otherwise."""
        return torch.amp.GradScaler(self.device_type, enabled=self.scaled)


def training_precision(dtype: str | None, device: torch.device) -> Precision:
    """The precision ``--dtype`` asks for on ``device`` (default: bfloat16 on CUDA, float32 elsewhere);
    TrainingSetupError for what training there cannot honour."""
    resolved = choose_dtype(dtype, device)
    name = str(resolved).removeprefix("torch.")
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise TrainingSetupError(f"dtype {name}: training computes in float32, bfloat16 or float16")
    if resolved == torch.float32 or device.type == "cuda" or (device.type == "cpu" and resolved == torch.bfloat16):
        return Precision(resolved, device.type)
    if resolved == torch.float16:
        raise TrainingSetupError(
            f"dtype float16 on {device.type}: float16 training needs CUDA (its gradient scaler runs there); "
            "use bfloat16 or float32"
        )
    raise TrainingSetupError(f"dtype {name} on {device.type}: training there computes in float32")
