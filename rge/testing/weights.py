"""Weights of tiny checkpoints: as uneven as a trained model's, and an ``<emb>`` that greedy decoding reaches.

A freshly initialised model has RMSNorm weights of exactly 1 and zero biases, so the final-norm state and
the pre-norm state point the same way and a bias that is dropped changes nothing: tests on such a model
cannot see those bugs. Here norms, biases and the (tied, padded) vocabulary all carry random values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .tokenizer import EMB, QWEN25_VL_CHAT_TEMPLATE

PROBE_PROMPTS = [
    "What is in the image?",
    "Find the caption of this photo.",
    "Which animal is on the left side of the picture?",
    "cat",
    "Summarize: a red car parked by a tree near the river.",
    "Retrieve a Wikipedia paragraph that answers this question.",
    "How many people are standing in the kitchen, and what are they cooking for dinner tonight?",
    "dog and tiger",
    "Represent the given news headline for retrieval.",
    "Is the umbrella red or blue?",
    "A forest in winter.",
    "Select the object labeled as a bicycle in the scene.",
]


def randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """Matrices larger than the default init (so states and logits vary across inputs), norm weights
    spread around 1 and non-zero biases."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2:
                parameter.normal_(0.0, parameter.shape[1] ** -0.5, generator=generator)
            elif name.endswith("bias"):
                parameter.normal_(0.0, 0.3, generator=generator)
            elif "norm" in name or "ln_q" in name:
                parameter.uniform_(0.3, 1.7, generator=generator)


def install_emb_trigger(model: Any, tokenizer: Any, budget: int, repetition_penalty: float) -> None:
    """Make ``<emb>`` the greedy choice wherever one chosen ordinary token would be.

    The token is chosen by decoding the probe prompts as ``generate`` will (with ``repetition_penalty``):
    the one whose first appearance varies most across them, so that some prompts stop within a few steps
    and some never stop within ``budget``. With tied embeddings the row is also ``<emb>``'s input embedding.
    """
    from ..prompts import PromptTemplate

    template = PromptTemplate.from_chat_template(tokenizer, QWEN25_VL_CHAT_TEMPLATE)
    emb_id = tokenizer.convert_tokens_to_ids(EMB)
    ordinary = set(range(len(tokenizer))) - set(tokenizer.all_special_ids)
    first_steps: dict[int, list[int]] = {token: [] for token in ordinary}
    for prompt in PROBE_PROMPTS:
        generated = _greedy(model, tokenizer(template.query(prompt))["input_ids"], budget, repetition_penalty)
        seen: dict[int, int] = {}
        for step, token in enumerate(generated):
            seen.setdefault(token, step)
        for token in ordinary:
            first_steps[token].append(seen.get(token, budget))
    chosen = max(sorted(ordinary), key=lambda token: _trigger_score(first_steps[token], budget))
    with torch.no_grad():
        head = model.lm_head.weight
        head[emb_id] = head[chosen] * 1.02


def _trigger_score(steps: Sequence[int], budget: int) -> float:
    """Prefer tokens met early by some prompts, late by others and never by about a third."""
    never = sum(step >= budget for step in steps)
    met = [step for step in steps if step < budget]
    if not met or never == 0:
        return -1.0
    spread = len(set(met)) + (max(met) - min(met)) / budget
    balance = 1.0 - abs(never / len(steps) - 1 / 3)
    early = any(step <= 4 for step in met)
    return spread * balance + (2.0 if early else 0.0)


def _greedy(model: Any, input_ids: list[int], steps: int, repetition_penalty: float) -> list[int]:
    from transformers import GenerationConfig

    settings = GenerationConfig(
        max_new_tokens=steps, min_new_tokens=steps, do_sample=False, repetition_penalty=repetition_penalty,
        eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    with torch.no_grad():
        out = model.generate(
            torch.tensor([input_ids]),
            attention_mask=torch.ones(1, len(input_ids), dtype=torch.long),
            generation_config=settings,
        )
    return out[0, len(input_ids) :].tolist()
