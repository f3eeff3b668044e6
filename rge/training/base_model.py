"""Training from the base model: a plain Qwen2.5-VL-Instruct checkpoint gets ``<emb>`` in its tokenizer
and vocabulary, so that ``rge train`` saves an RGE checkpoint.

``<emb>`` becomes a special token with the next id, ``len(tokenizer)`` (151665 for Qwen2.5-VL, the id RGE
has). The published vocabulary is padded past the tokenizer (151,936 rows), so that id is a spare row;
a vocabulary without one is resized to the next multiple of 64 (transformers' ``resize_token_embeddings``).
The row starts as the mean of the rows of the tokenizer's tokens, in the input embeddings and, when the
head is not tied to them, in the output head too (tied, it is the same row). The mean keeps ``<emb>``'s
logit at the average of the others, so the untrained model neither emits it everywhere nor can never
learn to (Hewitt, "Initializing New Word Embeddings for Pretrained Language Models", 2021); the padding
rows, never trained, would be an arbitrary start. An RGE checkpoint is loaded as it is.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..encoder import RGEEncoder
from ..loading import choose_attention, load_checkpoint, load_tokenizer, resolve_checkpoint
from ..prompts import EMB_TOKEN

VOCAB_MULTIPLE = 64
"""A vocabulary that has to grow is padded to a multiple of this (as Qwen's is)."""

logger = logging.getLogger("rge.training")


def load_training_encoder(
    name: str,
    *,
    device: torch.device,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    max_new_tokens: int = 128,
    repetition_penalty: float | None = None,
) -> tuple[RGEEncoder, bool]:
    """The model ``name`` names, in float32 on ``device``, and whether ``<emb>`` was added to it: an RGE
    checkpoint loads as it is; a base Qwen2.5-VL-Instruct checkpoint gets ``<emb>`` (see the module)."""
    options: dict[str, Any] = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    path = resolve_checkpoint(name)
    tokenizer = load_tokenizer(path)
    if EMB_TOKEN in tokenizer.get_vocab():
        encoder = RGEEncoder.from_pretrained(name, device=device, dtype=torch.float32, max_new_tokens=max_new_tokens,
                                             repetition_penalty=repetition_penalty, **options)  # fmt: skip
        return encoder, False
    known = len(tokenizer)
    emb_id = add_emb_token(tokenizer)
    checkpoint = load_checkpoint(path, device=device, dtype=torch.float32, tokenizer=tokenizer,
                                 attn_implementation=choose_attention(None, device), **options)  # fmt: skip
    add_emb_row(checkpoint.model, emb_id, known_tokens=known)
    logger.info("%s has no %s token: added as id %d", name, EMB_TOKEN, emb_id)
    checkpoint.name = str(name)
    encoder = RGEEncoder(checkpoint, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
    return encoder, True


def add_emb_token(tokenizer: Any) -> int:
    """Add ``<emb>`` to a base model's tokenizer as a special token (skipped when decoding, never split);
    returns its id."""
    tokenizer.add_special_tokens({"extra_special_tokens": [EMB_TOKEN]}, replace_extra_special_tokens=False)
    return int(tokenizer.convert_tokens_to_ids(EMB_TOKEN))


def untied_head(model: Any) -> Any | None:
    """``model``'s output head when it has a weight of its own; None when it shares the input embeddings'."""
    head = model.get_output_embeddings()
    return None if head is None or head.weight is model.get_input_embeddings().weight else head


def add_emb_row(model: Any, emb_id: int, *, known_tokens: int) -> None:
    """Give ``emb_id`` its embedding row in ``model``: a spare padded row, else a resized vocabulary, set to
    the mean of the first ``known_tokens`` rows (the tokenizer's tokens) in every embedding matrix."""
    if emb_id >= model.get_input_embeddings().num_embeddings:
        # mean_resizing=False: the padding rows keep transformers' initialisation, <emb>'s is set below.
        model.resize_token_embeddings(emb_id + 1, pad_to_multiple_of=VOCAB_MULTIPLE, mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    head = untied_head(model)
    if head is not None:  # an untied head has a row of its own
        matrices.append(head.weight)
    with torch.no_grad():
        for weight in matrices:
            weight[emb_id] = weight[:known_tokens].float().mean(dim=0).to(weight.dtype)
