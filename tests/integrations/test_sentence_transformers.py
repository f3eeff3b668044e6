"""The sentence-transformers model in sentence-transformers' own machinery: a pool of worker processes, and the
query path reached by plain ``encode`` calls (the only call Chroma's and LanceDB's functions make)."""

from __future__ import annotations

import numpy as np

from rge.integrations.sentence_transformers import to_sentence_transformer
from rge.testing import make_test_image

from ..conftest import load_tiny
from ..processes import call_bounded
from .vectors import assert_same_vectors

QUERIES = ["What is in the image?", "Which animal is on the left?"]
POOL_TIMEOUT = 240.0
"""Seconds one pooled call may take: each worker starts a fresh interpreter (torch, rge) before it embeds."""


def test_a_pool_of_processes_gives_the_vectors_of_one_process(tiny_path):
    """``start_multi_process_pool`` pickles the whole model into each worker: its threads, locks and decode cache
    stay behind, and both paths give the vectors one process gives."""
    model = to_sentence_transformer(load_tiny(tiny_path, "cpu"))  # its own: the pool puts it in shared memory
    items = [QUERIES[0], {"text": "Describe it.", "image": make_test_image(64, 48, seed=1)}, "cat"]
    methods = {"encode_query": model.encode_query, "encode_document": model.encode_document}
    expected = {name: method(items) for name, method in methods.items()}
    pool = model.start_multi_process_pool(["cpu", "cpu"])

    def workers() -> str:
        return ", ".join(f"worker {process.pid} " + ("still running" if process.is_alive()
                                                      else f"ended with {process.exitcode}")
                         for process in pool["processes"])  # fmt: skip

    try:
        for name, method in methods.items():
            pooled = call_bounded(lambda method=method: method(items, pool=pool, chunk_size=1), POOL_TIMEOUT,
                                  lambda name=name: f"{name} over the pool ({workers()})")  # fmt: skip
            assert_same_vectors(pooled, expected[name])
    finally:
        model.stop_multi_process_pool(pool)  # (terminates the workers, stuck or not)
    assert not np.allclose(expected["encode_query"], expected["encode_document"], atol=1e-3)


def test_plain_encode_takes_the_query_path_when_told(encoder, tmp_path):
    """``encode`` with ``prompt_name="query"`` or ``task="query"``, or a model whose default prompt is "query",
    reasons; without them, and in ``encode_document``, it does not."""
    from sentence_transformers import SentenceTransformer

    queries, documents = encoder.encode_query(QUERIES), encoder.encode_document(QUERIES)
    model = to_sentence_transformer(encoder)
    unit = {"normalize_embeddings": True}
    assert_same_vectors(model.encode(QUERIES, prompt_name="query", **unit), queries)
    assert_same_vectors(model.encode(QUERIES, task="query", **unit), queries)
    assert_same_vectors(model.encode(QUERIES, **unit), documents)
    assert_same_vectors(model.encode(QUERIES, prompt_name="document", **unit), documents)
    assert not np.allclose(queries, documents, atol=1e-3)
    to_sentence_transformer(encoder, default_prompt_name="query").save(str(tmp_path / "query-st"))
    reloaded = SentenceTransformer(str(tmp_path / "query-st"), trust_remote_code=True, device="cpu")
    assert reloaded.default_prompt_name == "query"
    assert_same_vectors(reloaded.encode(QUERIES, **unit), queries)
    assert_same_vectors(reloaded.encode_document(QUERIES, **unit), documents)


def test_chroma_and_lancedb_sentence_transformer_functions_reason_with_the_query_prompt(encoder, tmp_path):
    """The stores' own sentence-transformers functions, on a saved folder, offline: Chroma's passes
    ``default_prompt_name`` to the model (and keeps it in its configuration); LanceDB's reads it from the folder."""
    from chromadb.utils.embedding_functions import SentenceTransformerEmbeddingFunction
    from lancedb.embeddings import get_registry

    queries = encoder.encode_query(QUERIES)
    to_sentence_transformer(encoder).save(str(tmp_path / "st"))
    chroma = SentenceTransformerEmbeddingFunction(model_name=str(tmp_path / "st"), device="cpu",
                                                  trust_remote_code=True, default_prompt_name="query")  # fmt: skip
    assert_same_vectors(chroma.embed_query(QUERIES), queries)
    assert chroma.get_config()["kwargs"]["default_prompt_name"] == "query"  # a stored collection keeps it
    to_sentence_transformer(encoder, default_prompt_name="query").save(str(tmp_path / "query-st"))
    lance = get_registry().get("sentence-transformers").create(name=str(tmp_path / "query-st"))
    assert_same_vectors(lance.compute_query_embeddings(QUERIES[0]), queries[0])


def test_haystack_sentence_transformer_embedders_reason_with_the_query_prompt(encoder, tmp_path):
    """Haystack's own sentence-transformers embedders on a saved folder: ``encode_kwargs`` with the ``query``
    prompt name makes the text embedder reason; the document embedder stays on the document path."""
    from haystack import Document
    from haystack_integrations.components.embedders.sentence_transformers import (
        SentenceTransformersDocumentEmbedder,
        SentenceTransformersTextEmbedder,
    )

    to_sentence_transformer(encoder).save(str(tmp_path / "st"))
    options = {"model": str(tmp_path / "st"), "trust_remote_code": True, "local_files_only": True,
               "progress_bar": False, "normalize_embeddings": True}  # fmt: skip
    texts = SentenceTransformersTextEmbedder(**options, encode_kwargs={"prompt_name": "query"})
    texts.warm_up()
    embedded = [texts.run(text=query)["embedding"] for query in QUERIES]
    assert_same_vectors(np.array(embedded), encoder.encode_query(QUERIES))
    documents = SentenceTransformersDocumentEmbedder(**options)
    documents.warm_up()
    stored = documents.run(documents=[Document(content=text) for text in QUERIES])["documents"]
    assert_same_vectors(np.array([document.embedding for document in stored]), encoder.encode_document(QUERIES))
