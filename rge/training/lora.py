"""LoRA / DoRA through peft (``--lora``): the adapter, the ``<emb>`` row of a base model, and the frozen
weights' storage (``--weights-dtype``).

- **The adapter**: gaussian init on the ``lora_target_modules`` (the authors'), DoRA unless ``dora`` is off.
- **The ``<emb>`` row**: a base model gets ``<emb>`` in a row that starts as the mean of the others
  (``base_model.py``). The embedding matrix is frozen under LoRA, so that row is trained on its own through
  peft's ``trainable_token_indices``: a float32 copy of the row trains and replaces it in the forward, the
  rest of the matrix stays frozen. A tied output head shares it (peft ties the two); an untied head gets its
  own trained row. Merging writes the trained rows into the saved model.
- **Frozen weights in bfloat16**: with ``weights_dtype`` bfloat16, every parameter that does not train is
  cast after the adapter is added (which leaves the adapter and the ``<emb>`` rows float32), halving their
  memory. A trained parameter stays float32 so that small optimiser updates are not rounded away.
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Any

import torch

from ..errors import TrainingSetupError, require_extra
from .base_model import untied_head
from .config import TrainingConfig
from .optimizers import quiet_bitsandbytes


def require_peft() -> ModuleType:
    """peft (the ``train`` extra), imported quietly: it imports bitsandbytes when that is installed."""
    with quiet_bitsandbytes():
        return require_extra("peft", extra="train", needed_by="LoRA training")


def with_lora(model: Any, config: TrainingConfig, *, emb_id: int | None = None) -> Any:
    """``model`` wrapped in a peft LoRA / DoRA adapter as ``config`` says, its frozen weights then stored in
    ``config.weights_dtype``; ``emb_id`` (a base model's new ``<emb>``) names the row that trains with it."""
    peft = require_peft()
    rows = None if emb_id is None else _trained_rows(model, emb_id)
    lora = peft.LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                           target_modules=list(config.lora_target_modules), use_dora=config.dora,
                           init_lora_weights="gaussian", trainable_token_indices=rows)  # fmt: skip
    try:
        with warnings.catch_warnings():  # peft reads a property transformers 5.x deprecated: not the user's doing
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            peft_model = peft.get_peft_model(model, lora)
    except ValueError as error:
        raise TrainingSetupError(f"LoRA: {error}") from None
    store_frozen_weights(model, getattr(torch, config.weights_dtype))
    return peft_model


def store_frozen_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters of ``model`` that do not train to ``dtype`` in place (tied ones stay tied)."""
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != dtype:
                parameter.data = parameter.data.to(dtype)


def _trained_rows(model: Any, emb_id: int) -> list[int] | dict[str, list[int]]:
    """``trainable_token_indices`` for ``emb_id``: the input embeddings' row (a tied head follows it), and
    the head's own row when it is not tied."""
    if untied_head(model) is None:
        return [emb_id]
    return {"embed_tokens": [emb_id], "lm_head": [emb_id]}
