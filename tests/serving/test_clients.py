"""The clients RAG pipelines use, pointed at the server unchanged: LangChain's OpenAIEmbeddings and
LlamaIndex's OpenAI-like embedding class (the official openai client is used throughout the other tests), and
the query model name, for clients that cannot send ``input_type``."""

from __future__ import annotations

import asyncio

import openai
import pytest

from rge.serving import ServerSettings

from ..test_candidates import cosine
from .conftest import MODEL, running_server

DOCUMENTS = ["a red car parked by a tree", "two cats on a sofa"]
QUERY = "Which animal is on the sofa?"
QUERY_MODEL = f"{MODEL}-query"


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


def assert_query_vector(encoder, text, vector):
    """``vector`` is ``text`` on the query path, and far from the document path."""
    assert cosine(encoder.encode_query(text), vector) >= 0.9999
    assert cosine(encoder.encode_document(text), vector) < 0.999


def test_the_query_model_name_reasons_for_clients_without_extra_fields(server, encoder):
    """``model="<name>-query"``: the openai client, LangChain's ``embed_query`` and LlamaIndex's
    ``get_query_embedding`` reach the query path with nothing but the model name; ``/v1/models`` lists it."""
    from langchain_openai import OpenAIEmbeddings
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding

    client = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)
    assert [model.id for model in client.models.list()] == [MODEL, QUERY_MODEL]
    answer = client.embeddings.create(model=QUERY_MODEL, input=[QUERY, DOCUMENTS[0]])
    assert answer.model == QUERY_MODEL
    for text, entry in zip([QUERY, DOCUMENTS[0]], answer.data):
        assert_query_vector(encoder, text, entry.embedding)
    document = client.embeddings.create(model=MODEL, input=QUERY).data[0].embedding  # the document path, as before
    assert cosine(encoder.encode_document(QUERY), document) >= 0.9999
    with pytest.raises(openai.BadRequestError, match="embeds queries") as refused:
        client.embeddings.create(model=QUERY_MODEL, input=QUERY, extra_body={"input_type": "document"})
    assert refused.value.body["param"] == "input_type"
    langchain = OpenAIEmbeddings(model=QUERY_MODEL, base_url=f"{server[0]}/v1", api_key="unused",
                                 check_embedding_ctx_length=False)  # fmt: skip
    assert_query_vector(encoder, QUERY, langchain.embed_query(QUERY))
    llama_index = OpenAILikeEmbedding(model_name=QUERY_MODEL, api_base=f"{server[0]}/v1", api_key="unused")
    assert_query_vector(encoder, QUERY, llama_index.get_query_embedding(QUERY))


def test_the_query_model_suffix_is_the_operators(encoder):
    with running_server(encoder, query_model_suffix=":q") as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [model.id for model in client.models.list()] == [MODEL, f"{MODEL}:q"]
        assert_query_vector(encoder, QUERY, client.embeddings.create(model=f"{MODEL}:q", input=QUERY).data[0].embedding)
    with running_server(encoder, query_model_suffix="") as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [model.id for model in client.models.list()] == [MODEL]
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.embeddings.create(model=QUERY_MODEL, input=QUERY)
    with pytest.raises(ValueError, match="would name both a model and the query name"):
        ServerSettings(model_names=("a", "a-query"))
