"""Adapters for the pipelines RGE users already have; each is an optional extra, imported on demand.

- ``rge.integrations.langchain.RGEEmbeddings`` (extra ``langchain``)
- ``rge.integrations.llama_index.RGEEmbedding`` (extra ``llama-index``)
- ``rge.integrations.sentence_transformers.to_sentence_transformer`` (extra ``sentence-transformers``)
- ``rge.integrations.mteb.RGEMtebModel`` and ``RGE_MODEL_META`` (extra ``mteb``)
- ``rge.integrations.haystack.RGETextEmbedder`` and ``RGEDocumentEmbedder`` (extra ``haystack``)
- ``rge.integrations.chroma.RGEEmbeddingFunction`` (extra ``chroma``)
- ``rge.integrations.lancedb.RGEEmbeddingFunction``, registered as ``"rge"`` (extra ``lancedb``)

An extra installs with ``pip install "rge-embeddings[EXTRA]"``; importing an adapter without it raises
``rge.errors.RGEMissingExtraError`` (an ``ImportError``) with that command.

Everywhere, queries take the reasoning path and documents the candidate path.
"""
