"""Adapters for the pipelines RGE users already have; each is an optional extra, imported on demand.

- ``rge.integrations.langchain.RGEEmbeddings`` (``pip install 'rge[langchain]'``)
- ``rge.integrations.llama_index.RGEEmbedding`` (``pip install 'rge[llama-index]'``)
- ``rge.integrations.sentence_transformers.to_sentence_transformer`` (``pip install 'rge[sentence-transformers]'``)
- ``rge.integrations.mteb.RGEMtebModel`` and ``RGE_MODEL_META`` (``pip install 'rge[mteb]'``)

Everywhere, queries take the reasoning path and documents the candidate path.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or fail with the command that installs the extra providing it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{module} is not installed; install it with: pip install 'rge[{extra}]'") from error
