"""Decoding settings: what the authors' ``generate`` call does with the checkpoint's ``generation_config.json``.

The authors call ``generate(**inputs, max_new_tokens=128, eos_token_id=<emb>, use_cache=True)`` with no
decoding arguments, so transformers decodes with the checkpoint's generation config. RGE carries
Qwen2.5-VL-3B-Instruct's: ``do_sample: true, top_k: 1, top_p: 0.001, temperature: 0.1,
repetition_penalty: 1.05``. With ``top_k: 1`` sampling keeps a single candidate, so the result is the
arg-max of the logits after the repetition penalty; rge reproduces exactly that. Settings that would make
decoding random are not reproduced (rge never samples): rge decodes greedily with the penalty and warns.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

GENERATION_CONFIG_FILE = "generation_config.json"

IGNORED_SETTINGS = {
    "num_beams": 1,
    "no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "min_new_tokens": None,
    "min_length": 0,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
}
"""Settings whose non-default values would change ``generate``'s tokens and that rge does not apply."""


class RGEDecodingWarning(UserWarning):
    """The checkpoint asks for decoding that rge does not reproduce exactly (random sampling, beams, ...)."""


@dataclass(frozen=True)
class GenerationSettings:
    """How the query path chooses rationale tokens: the arg-max of the logits after ``repetition_penalty``.

    ``repetition_penalty`` divides the positive logits (multiplies the negative ones) of every token id
    already in the row (prompt, image placeholders and system turn included), as transformers does.
    ``do_sample``, ``temperature``, ``top_k`` and ``top_p`` are the checkpoint's sampling settings, kept to
    tell whether its sampling is deterministic; ``source`` says where the settings were read.
    """

    repetition_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    source: str = "defaults"

    def __post_init__(self) -> None:
        penalty = self.repetition_penalty
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty > 0:
            raise ValueError(f"repetition_penalty must be a positive number, got {penalty!r}")

    @classmethod
    def from_checkpoint(cls, path: Path) -> GenerationSettings:
        """The settings of ``path/generation_config.json``; transformers' defaults (plain greedy) without it.

        Warns (``RGEDecodingWarning``) when the file asks for decoding that rge does not reproduce.
        """
        file = path / GENERATION_CONFIG_FILE
        if not file.is_file():
            return cls()
        config = json.loads(file.read_text(encoding="utf-8"))
        settings = cls(
            repetition_penalty=float(config.get("repetition_penalty") or 1.0),
            do_sample=bool(config.get("do_sample", False)),
            temperature=float(config.get("temperature") or 1.0),
            top_k=config.get("top_k"),
            top_p=config.get("top_p"),
            source=str(file),
        )
        ignored = {key: config[key] for key, default in IGNORED_SETTINGS.items() if config.get(key, default) != default}
        if ignored:
            warnings.warn(f"{file} sets {ignored}, which rge does not apply", RGEDecodingWarning, stacklevel=2)
        if settings.samples_at_random:
            warnings.warn(
                f"{file} samples at random (do_sample with top_k={settings.top_k}, top_p={settings.top_p}); "
                f"rge decodes greedily with repetition_penalty={settings.repetition_penalty}, so rationales are "
                "deterministic and may differ from a sampled generate",
                RGEDecodingWarning,
                stacklevel=2,
            )
        return settings

    @property
    def samples_at_random(self) -> bool:
        """True when ``generate`` would draw among several tokens (``top_p`` checked per step, see below)."""
        return self.do_sample and self.top_k != 1 and (self.top_p is None or self.top_p >= 1.0)

    @property
    def top_p_check(self) -> bool:
        """Sampling whose ``top_p`` alone narrows the choice: deterministic while the best token holds at
        least ``top_p`` of the probability, which the decoder checks on every step."""
        return self.do_sample and self.top_k != 1 and self.top_p is not None and self.top_p < 1.0

    def with_penalty(self, repetition_penalty: float | None) -> GenerationSettings:
        """These settings with ``repetition_penalty`` overridden (``None`` keeps it)."""
        if repetition_penalty is None:
            return self
        return replace(self, repetition_penalty=repetition_penalty, source=f"{self.source}, overridden")

    def as_dict(self) -> dict[str, Any]:
        """The settings that decide tokens (``source`` left out), e.g. to record a job's settings."""
        settings = asdict(self)
        del settings["source"]
        return settings


def row_token_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) ids of left-padded rows, for the penalty: each pad replaced by its row's last token, so that
    padding adds no id of its own (the penalty treats the ids of a row as a set)."""
    return torch.where(attention_mask.bool(), input_ids, input_ids[:, -1:])


def apply_repetition_penalty(scores: torch.Tensor, token_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty, in place, on float32 ``scores`` (R, vocab) for the ids in
    ``token_ids`` (R, T); returns ``scores``.

    The same gather, ``where`` and scatter as ``RepetitionPenaltyLogitsProcessor``: its cost grows with the
    rows' lengths, not with the vocabulary; a repeated id is written twice with the same value, so a row's
    ids may repeat (a fixed-width buffer pads with the row's own ids).
    """
    score = torch.gather(scores, 1, token_ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return scores.scatter_(1, token_ids, score)


def top_p_holds(scores: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """Per row: whether top-p sampling keeps the best token alone (so the arg-max is its draw); a tensor,
    read with the step's other results."""
    assert settings.top_p is not None
    return torch.softmax(scores / settings.temperature, dim=-1).amax(dim=-1) >= settings.top_p
