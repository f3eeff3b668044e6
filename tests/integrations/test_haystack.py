"""Haystack components: the encoder's own vectors (queries reason, documents do not), in real pipelines."""

from __future__ import annotations

import haystack.telemetry._telemetry
import numpy as np
import pytest
from haystack import Document, Pipeline
from haystack.components.retrievers.in_memory import InMemoryEmbeddingRetriever
from haystack.components.writers import DocumentWriter
from haystack.dataclasses import ByteStream, ImageContent
from haystack.document_stores.in_memory import InMemoryDocumentStore

from rge import RGEEncoder
from rge.integrations.haystack import RGEDocumentEmbedder, RGETextEmbedder

from .vectors import assert_same_vectors

QUERY = "What is in the image?"


@pytest.fixture(autouse=True)
def no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(haystack.telemetry._telemetry, "telemetry", None)


def test_embedders_give_the_encoders_vectors(encoder, image_paths):
    text_embedder = RGETextEmbedder(encoder=encoder)
    assert_same_vectors(text_embedder.run(text=QUERY)["embedding"], encoder.encode_query(QUERY))
    with_image = text_embedder.run(text=QUERY, image=ImageContent.from_file_path(image_paths[0]))["embedding"]
    assert_same_vectors(with_image, encoder.encode_query({"text": QUERY, "image": image_paths[0]}))

    documents = [
        Document(content="A cat and a dog.", meta={"title": "Pets", "file_path": "notes/pets.pdf"}),  # not an image
        Document(meta={"file_path": image_paths[0]}),
        Document(content="a drawing", blob=ByteStream.from_file_path(image_paths[1], mime_type="image/png")),
    ]
    embedder = RGEDocumentEmbedder(encoder=encoder, meta_fields_to_embed=["title"], embedding_separator=" | ")
    embedded = embedder.run(documents=documents)["documents"]
    expected = encoder.encode_document(
        [{"text": "Pets | A cat and a dog."}, {"image": image_paths[0]}, {"text": "a drawing", "image": image_paths[1]}]
    )
    assert_same_vectors([document.embedding for document in embedded], expected)
    assert [document.content for document in embedded] == [document.content for document in documents]
    assert all(document.embedding is None for document in documents)  # copies, as Haystack's embedders return
    assert embedder.run(documents=[]) == {"documents": []}
    with pytest.raises(TypeError, match="one str"):
        text_embedder.run(text=[QUERY])
    with pytest.raises(TypeError, match="list of Documents"):
        embedder.run(documents=QUERY)


def test_image_files_are_found_under_root_path_and_never_outside_it(encoder, image_paths):
    folder, name = image_paths[0].rsplit("/", 1)
    embedder = RGEDocumentEmbedder(encoder=encoder, root_path=folder)
    (document,) = embedder.run(documents=[Document(content="x", meta={"file_path": name})])["documents"]
    assert_same_vectors(document.embedding, encoder.encode_document({"text": "x", "image": image_paths[0]}))
    with pytest.raises(ValueError, match="outside root_path"):
        embedder.run(documents=[Document(content="x", meta={"file_path": f"../{name}"})])


def test_indexing_and_query_pipelines(encoder, image_paths):
    store = InMemoryDocumentStore(embedding_similarity_function="cosine")
    indexing = Pipeline()
    indexing.add_component("embedder", RGEDocumentEmbedder(encoder=encoder))
    indexing.add_component("writer", DocumentWriter(document_store=store))
    indexing.connect("embedder.documents", "writer.documents")
    documents = [Document(content="A cat and a dog."), Document(content="A cat and a tiger."),
                 Document(content="a photo", meta={"file_path": image_paths[0]})]  # fmt: skip
    assert indexing.run({"embedder": {"documents": documents}})["writer"]["documents_written"] == 3

    querying = Pipeline()
    querying.add_component("embedder", RGETextEmbedder(encoder=encoder))
    querying.add_component("retriever", InMemoryEmbeddingRetriever(document_store=store, top_k=3))
    querying.connect("embedder.embedding", "retriever.query_embedding")
    hits = querying.run({"embedder": {"text": QUERY}})["retriever"]["documents"]

    photo = {"text": "a photo", "image": image_paths[0]}
    vectors = encoder.encode_document(["A cat and a dog.", "A cat and a tiger.", photo])
    scores = vectors @ encoder.encode_query(QUERY)
    assert [hit.id for hit in hits] == [documents[i].id for i in np.argsort(-scores)]
    np.testing.assert_allclose([hit.score for hit in hits], np.sort(scores)[::-1], atol=1e-4)

    reloaded = Pipeline.loads(querying.dumps(), allowed_modules=["rge.integrations.haystack"])
    assert reloaded.get_component("embedder").encoder is encoder  # the live encoder, not a second copy
    again = reloaded.run({"embedder": {"text": QUERY}})["retriever"]["documents"]
    assert [hit.id for hit in again] == [hit.id for hit in hits]


def test_to_dict_saves_the_model_and_options_and_loads_lazily(encoder, tiny_path, tmp_path, monkeypatch):
    loads = []
    original = RGEEncoder.from_pretrained.__func__

    def counting(cls, name, **options):
        loads.append(name)
        return original(cls, name, **options)

    monkeypatch.setattr(RGEEncoder, "from_pretrained", classmethod(counting))
    options = {"device": "cpu", "dtype": encoder.dtype, "min_pixels": 4 * 28 * 28, "max_pixels": 64 * 28 * 28,
               "max_new_tokens": encoder.max_new_tokens}  # fmt: skip
    embedder = RGEDocumentEmbedder(model_name=str(tiny_path), token="hf_secret", cache_dir=tmp_path,
                                   meta_fields_to_embed=["title"], prompt_name="vqa", **options)  # fmt: skip
    data = embedder.to_dict()
    assert data["type"] == "rge.integrations.haystack.RGEDocumentEmbedder" and loads == []  # nothing loaded yet
    parameters = data["init_parameters"]
    assert parameters["model_name"] == str(tiny_path) and parameters["dtype"] == "float32"
    assert parameters["cache_dir"] == str(tmp_path) and "token" not in parameters  # a credential is never saved
    assert parameters["meta_fields_to_embed"] == ["title"] and parameters["prompt_name"] == "vqa"

    rebuilt = RGEDocumentEmbedder.from_dict(data)
    assert rebuilt.to_dict() == data and loads == []
    rebuilt.warm_up()
    embedder.warm_up()
    assert loads == [str(tiny_path)] and embedder.encoder is rebuilt.encoder  # loaded once for both
    (document,) = rebuilt.run(documents=[Document(content="A cat.", meta={"title": "Pets"})])["documents"]
    assert_same_vectors(document.embedding, encoder.encode_document("Pets\nA cat.", prompt_name="vqa"))

    given = RGETextEmbedder(encoder=encoder, query_prompt="Answer briefly.").to_dict()
    saved = given["init_parameters"]
    assert saved["model_name"] == str(tiny_path.resolve()) and saved["max_new_tokens"] == encoder.max_new_tokens
    assert saved["query_prompt"] == "Answer briefly." and saved["min_pixels"] == 4 * 28 * 28
    assert RGETextEmbedder.from_dict(given).encoder is encoder and loads == [str(tiny_path)]
    with pytest.raises(ValueError, match="only apply with model_name"):
        RGETextEmbedder(encoder=encoder, device="cpu")
