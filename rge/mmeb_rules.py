"""The MMEB authors' per-subset rewrite rules, shipped byte-for-byte in ``rge/eval/data/``: evaluation
(``rge eval mmeb``) and training on MMEB-train rewrite texts with them."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import yaml

RULE_FILES = {"query": "instruction_replacements-eval.yaml", "candidate": "candidate_replacements.yaml",
              "training_query": "instruction_replacements.yaml"}  # fmt: skip
"""Each side's file in ``rge/eval/data/``."""


@cache
def load_rules(side: str) -> dict[str, dict[str, Any]]:
    """The authors' per-subset rewrite rules: ``side`` is "query" (eval variant), "candidate" (both), or
    "training_query" (the training-time variant, keyed by MMEB-train subset names)."""
    path = resources.files("rge").joinpath(f"eval/data/{RULE_FILES[side]}")
    return dict(yaml.safe_load(path.read_text(encoding="utf-8")))


def rewrite(text: str, rules: dict[str, Any]) -> str:
    """Apply one subset's rules as the authors do, then add a trailing newline if missing."""
    value_map = rules.get("value_map")
    if isinstance(value_map, dict) and text in value_map:
        text = value_map[text]
    if rules.get("original") is not None:
        text = text.replace(rules["original"], rules.get("replacement", ""))
    if isinstance(rules.get("prefix_add"), str) and rules["prefix_add"]:
        text = rules["prefix_add"] + text
    if isinstance(rules.get("suffix_add"), str) and rules["suffix_add"]:
        text = text + rules["suffix_add"]
    return text if text.endswith("\n") else text + "\n"
