"""The clients RAG pipelines use, pointed at the server unchanged: LangChain's OpenAIEmbeddings and
LlamaIndex's OpenAI-like embedding class (the official openai client is used throughout the other tests)."""

from __future__ import annotations

import asyncio

from ..test_candidates import cosine
from .conftest import MODEL

DOCUMENTS = ["a red car parked by a tree", "two cats on a sofa"]
QUERY = "Which animal is on the sofa?"


def test_langchain_openai_embeddings(server, encoder):
    from langchain_openai import OpenAIEmbeddings

    common = {"model": MODEL, "base_url": f"{server[0]}/v1", "api_key": "unused", "check_embedding_ctx_length": False}
    documents = OpenAIEmbeddings(**common)
    queries = OpenAIEmbeddings(**common, model_kwargs={"extra_body": {"input_type": "query"}})
    for text, vector in zip(DOCUMENTS, documents.embed_documents(DOCUMENTS)):
        assert cosine(encoder.encode_document(text), vector) >= 0.9999
    assert cosine(encoder.encode_query(QUERY), queries.embed_query(QUERY)) >= 0.9999
    assert cosine(encoder.encode_query(QUERY), asyncio.run(queries.aembed_query(QUERY))) >= 0.9999
    # One instance can serve both sides: the query side per call.
    per_call = documents.embed_query(QUERY, extra_body={"input_type": "query"})
    assert cosine(encoder.encode_query(QUERY), per_call) >= 0.9999


def test_llama_index_openai_like_embedding(server, encoder):
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding

    common = {"model_name": MODEL, "api_base": f"{server[0]}/v1", "api_key": "unused"}
    documents = OpenAILikeEmbedding(**common)
    queries = OpenAILikeEmbedding(**common, additional_kwargs={"extra_body": {"input_type": "query"}})
    for text, vector in zip(DOCUMENTS, documents.get_text_embedding_batch(DOCUMENTS)):
        assert cosine(encoder.encode_document(text), vector) >= 0.9999
    assert cosine(encoder.encode_query(QUERY), queries.get_query_embedding(QUERY)) >= 0.9999
    assert cosine(encoder.encode_query(QUERY), asyncio.run(queries.aget_query_embedding(QUERY))) >= 0.9999
