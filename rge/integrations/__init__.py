"""Adapters for the pipelines RGE users already have; each is an optional extra, imported on demand.

- ``rge.integrations.langchain.RGEEmbeddings`` (extra ``langchain``)
- ``rge.integrations.llama_index.RGEEmbedding`` (extra ``llama-index``)
- ``rge.integrations.sentence_transformers.to_sentence_transformer`` (extra ``sentence-transformers``)
- ``rge.integrations.mteb.RGEMtebModel`` and ``RGE_MODEL_META`` (extra ``mteb``)
- ``rge.integrations.haystack.RGETextEmbedder`` and ``RGEDocumentEmbedder`` (extra ``haystack``)
- ``rge.integrations.chroma.RGEEmbeddingFunction`` (extra ``chroma``)
- ``rge.integrations.lancedb.RGEEmbeddingFunction``, registered as ``"rge"`` (extra ``lancedb``)

An extra installs with ``pip install 'rge-embeddings[EXTRA]'``.

Everywhere, queries take the reasoning path and documents the candidate path.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .._about import DISTRIBUTION


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or fail with the command that installs the extra providing it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{module} is not installed; install it with: pip install '{DISTRIBUTION}[{extra}]'"
        ) from error
